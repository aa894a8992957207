"""edgesmith: one run from a small language model and a dataset to every edge target."""

__version__ = "0.1.0"
