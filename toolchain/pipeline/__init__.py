"""The pipeline: the recipe, the registry tables, the plan, the runner and the artifact store."""
