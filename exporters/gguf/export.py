"""The `gguf` target: merged HF model -> one GGUF file, quantised by llama.cpp's own quantiser.

Float types are written directly. Quantised types go F32 GGUF (a temporary file) -> llama.cpp's
``llama_model_quantize``, with an importance matrix computed on the shared calibration sample when
the target asks for one (the file is kept beside the model as ``imatrix.gguf``).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from exporters.gguf.config import BASE_TYPES, GgufExportConfig
from toolchain.errors import PreflightError


def preflight(model_dir, options: dict | None = None) -> None:
    from exporters.gguf import preflight as writer_preflight

    try:
        cfg = GgufExportConfig(**(options or {}))
    except (TypeError, ValueError) as exc:
        raise PreflightError(f"gguf target: {exc}") from None
    writer_preflight(model_dir, {"out_type": cfg.quant if cfg.quant in BASE_TYPES else "F32"})


def export(model_dir, out_dir, options: dict | None = None, calibration: Path | None = None) -> dict:
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

    imatrix_path = None
    if cfg.imatrix:
        if calibration is None or not Path(calibration).is_file():
            raise PreflightError("gguf target with imatrix: true needs the calibration sample (the `calibrate` stage)")
        from exporters.gguf.imatrix import compute_imatrix, save_imatrix

        batches = json.loads(Path(calibration).read_text())["batches"]
        model_type = json.loads((Path(model_dir) / "config.json").read_text()).get("model_type", "llama")
        data = compute_imatrix(model_dir, batches, family=model_type)
        imatrix_path = save_imatrix(data, out_dir / "imatrix.gguf")
        info["imatrix_entries"] = len(data)
        info["imatrix_tokens"] = sum(len(b) for b in batches)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".gguf-f32-") as tmp:
        base = Path(tmp) / "model-F32.gguf"
        info["writer"] = write_gguf(model_dir, base, out_type="F32")
        info["quantize"] = quantize(base, out_dir / name, cfg.quant, imatrix_path=imatrix_path, threads=cfg.threads)
    return info
