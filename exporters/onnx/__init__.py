"""ONNX exporter: a hand-built Llama-style decoder graph with KV cache (see ``build.py``).

``export`` and ``preflight`` import the graph builder (and onnx) only when called, so reading a
recipe's ``onnx`` options (``config.py``) needs nothing but this package.
"""
from .config import OnnxExportConfig


def export(model_dir, out_dir, config=None, **kwargs) -> dict:
    """Export a merged HF model directory to ``out_dir`` (see ``exporters.onnx.build.export``)."""
    from .build import export as build

    return build(model_dir, out_dir, config, **kwargs)


def preflight(model_dir, config=None) -> None:
    """Refuse an architecture or setting the ONNX exporter cannot take (``exporters.onnx.build.preflight``)."""
    from .build import preflight as check

    return check(model_dir, config)


__all__ = ["OnnxExportConfig", "export", "preflight"]
