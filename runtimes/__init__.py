"""Runtimes: each loads one kind of exported artifact, generates, and is benchmarked."""
