"""The stages of a run, one module each: its plan(recipe, state) and its body (docs/architecture.md)."""
