"""Ground floor: what every layer may use (errors, atomic files, the benchmark schema, metrics, model I/O).

Imports nothing of edgesmith above it (tests/test_layers.py; docs/architecture.md).
"""
