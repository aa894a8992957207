"""The `gguf` target: merged HF model -> one GGUF file, quantised by llama.cpp's own quantiser.

Float types are written directly. Quantised types go F32 GGUF (a temporary file) -> llama.cpp's
``llama_model_quantize``, with the importance matrix of the `imatrix` stage (computed once on the
shared calibration sample, in llama.cpp's imatrix GGUF format) when the target asks for one.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from exporters.gguf.config import BASE_TYPES, GgufExportConfig
from toolchain.core.errors import PreflightError


def preflight(model_dir, options: dict | None = None) -> None:
    from exporters.gguf import preflight as writer_preflight

    try:
        cfg = GgufExportConfig(**(options or {}))
    except (TypeError, ValueError) as exc:
        raise PreflightError(f"gguf target: {exc}") from None
    writer_preflight(model_dir, {"out_type": cfg.quant if cfg.quant in BASE_TYPES else "F32"})


def export(model_dir, out_dir, options: dict | None = None, imatrix: Path | None = None) -> dict:
    """Write ``model-<QUANT>.gguf``; ``imatrix`` is the shared importance matrix (the `imatrix` stage)."""
    from exporters.gguf import write_gguf

    cfg = GgufExportConfig(**(options or {}))
    out_dir = Path(out_dir)
    name = f"model-{cfg.quant}.gguf"
    info: dict = {"format": "gguf", "precision": cfg.quant, "quant": cfg.quant, "imatrix": cfg.imatrix, "file": name,
                  "runtime_options": {"model_file": name}}
    if cfg.quant in BASE_TYPES:
        info["writer"] = write_gguf(model_dir, out_dir / name, out_type=cfg.quant)
        return info

    from exporters.gguf.quantize import quantize

    if cfg.imatrix and (imatrix is None or not Path(imatrix).is_file()):
        raise PreflightError("gguf target with imatrix: true needs the importance matrix (the `imatrix` stage)")
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".gguf-f32-") as tmp:
        base = Path(tmp) / "model-F32.gguf"
        info["writer"] = write_gguf(model_dir, base, out_type="F32")
        info["quantize"] = quantize(base, out_dir / name, cfg.quant, imatrix_path=imatrix if cfg.imatrix else None,
                                    threads=cfg.threads)
    return info
