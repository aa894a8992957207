"""ONNX exporter: a hand-built Llama-style decoder graph with KV cache (see ``export.py``)."""
from .config import OnnxExportConfig
from .export import export, preflight

__all__ = ["OnnxExportConfig", "export", "preflight"]
