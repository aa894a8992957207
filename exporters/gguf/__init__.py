"""GGUF exporter: a merged Hugging Face model directory -> one llama.cpp GGUF file (F32/F16/BF16).

- ``preflight(model_dir, options)`` refuses unsupported architectures, settings and tokenizers
  with a PreflightError before any tensor is read; it returns a short summary.
- ``write_gguf(model_dir, out_path, out_type)`` writes the file (temporary file, renamed when
  whole) and returns what it wrote: arch, tensor count, types, size, effective hyper-parameters,
  pre-tokenizer, special token ids, skipped tensors and warnings.

Quantised types (Q8_0, Q4_K_M, ...) are made from the F16/F32 file by llama.cpp's quantizer.
Layout: ``tables`` (format facts), ``families/`` (one module per model family: hyper-parameters
and tensor mapping), ``vocab`` (tokenizer metadata), ``writer`` (the file).
"""
from __future__ import annotations

from pathlib import Path

from .tables import OUT_TYPES, SUPPORTED_ARCHITECTURES
from .writer import run_preflight, write_gguf

__all__ = ["OUT_TYPES", "SUPPORTED_ARCHITECTURES", "preflight", "write_gguf"]


def preflight(model_dir: str | Path, options: dict | None = None) -> dict:
    """Raise PreflightError unless ``model_dir`` can be written as GGUF with ``options`` ({"out_type": ...})."""
    return run_preflight(model_dir, options).summary()
