"""Quality gates: how close each target must stay to the reference model."""
