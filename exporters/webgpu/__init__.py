"""Browser bundle exporter (registry name ``webgpu``): a static folder any web server can host,
holding a transformers.js model folder, our chat page and the vendored runtime.

    index.html, app.js              the chat page (web/page), also the test/benchmark API
    vendor/transformers/, vendor/ort/   transformers.js and onnxruntime-web's wasm (web/node_modules)
    bundle.json                     model id, dtype preference per device, versions
    models/<id>/...                 see layout.py
    README.txt                      how to serve it

The ONNX files are written by the onnx exporter (``exporters.onnx``) with the settings
onnxruntime-web runs (``WebgpuExportConfig.onnx_options``), checked against what onnxruntime-web
refuses (``browser_ops``), then laid out as transformers.js expects.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from exporters import place_bundle
from toolchain.core.errors import PreflightError

from .config import DTYPES, WebgpuExportConfig

__all__ = ["WebgpuExportConfig", "export", "preflight"]

BUNDLE_FILE = "bundle.json"
README = """edgesmith browser bundle: {model_id}

Serve this folder with any static web server and open index.html, e.g.
    python3 -m http.server --bind 127.0.0.1 8000     ->  http://127.0.0.1:8000/

The page loads everything from this folder (no CDN, no model hub). It uses WebGPU when the
browser offers an adapter (dtype preference: {webgpu}; float16 ones only with shader-f16) and
WebAssembly otherwise ({wasm}).

WebAssembly runs on several threads only when the page is cross-origin isolated: serve it with
    Cross-Origin-Opener-Policy: same-origin
    Cross-Origin-Embedder-Policy: require-corp
(a plain http.server does not, and the page then runs on one thread).
"""


def _config(config) -> WebgpuExportConfig:
    try:
        return WebgpuExportConfig.coerce(config)
    except (ValueError, TypeError) as e:
        raise PreflightError(f"webgpu export config: {e}") from None


def preflight(model_dir: str | Path, config=None) -> None:
    """Refuse, before any work, a model or setting the bundle cannot be built from."""
    from exporters import require_tokenizer_files
    from exporters.onnx import preflight as onnx_preflight

    from .vendor import check_installed

    cfg = _config(config)
    model_dir = Path(model_dir)
    require_tokenizer_files(model_dir, "webgpu")
    for dtype in cfg.dtypes:
        onnx_preflight(model_dir, cfg.onnx_options(dtype))
    check_installed()


def export(model_dir: str | Path, out_dir: str | Path, config=None, imatrix: str | Path | None = None,
           calibration: str | Path | None = None) -> dict:
    """Write the bundle into ``out_dir``; returns its manifest (format, precision of the dtype wasm
    runs, dtypes, files, sizes, versions, and ``runtime_options.model_file``: that dtype's ONNX
    file, which native onnxruntime benchmarks for the browser/native comparison)."""
    import onnx

    from exporters.onnx import export as onnx_export

    from .browser_ops import browser_problems, unverified_contrib_ops
    from .layout import onnx_name, place_onnx, write_model_files
    from .vendor import copy_page

    cfg = _config(config)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    preflight(model_dir, cfg)
    if cfg.imatrix and imatrix is None:
        raise PreflightError("webgpu export with `imatrix: true` needs the run's importance matrix (fix: run it "
                             "through `edgesmith run`, which computes one, or pass imatrix=)")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".bundle-", dir=out_dir))
    try:
        model_dest = tmp / "models" / cfg.model_id
        placed, graphs, warnings = {}, {}, []
        for dtype in cfg.dtypes:
            work = tmp / f".onnx-{dtype}"
            manifest = onnx_export(model_dir, work, cfg.onnx_options(dtype), imatrix=imatrix if cfg.imatrix else None)
            graph = onnx.load(str(work / "model.onnx"), load_external_data=False)
            problems = browser_problems(graph)
            if problems:
                raise PreflightError(f"webgpu export: the {dtype} graph would not run in onnxruntime-web: "
                                     + "; ".join(problems))
            unverified = unverified_contrib_ops(graph)
            if unverified:
                warnings.append(f"{dtype}: contrib op(s) {', '.join(unverified)} never run in onnxruntime-web here")
            placed[dtype] = place_onnx(work, model_dest / "onnx", dtype, cfg.external_data)
            graphs[dtype] = {"onnx_precision": manifest["precision"], "graph": manifest["graph"]["kind"],
                             "op_types": manifest["graph"]["op_types"],
                             "quantized_linears": manifest["graph"]["quantized_linears"], **placed[dtype]}
            shutil.rmtree(work)
        model_info = write_model_files(model_dir, model_dest, placed)
        page = copy_page(tmp)
        device_dtypes = cfg.device_dtypes()
        (tmp / "README.txt").write_text(README.format(model_id=cfg.model_id, webgpu=", ".join(device_dtypes["webgpu"]),
                                                      wasm=", ".join(device_dtypes["wasm"])))
        bundle = {"model_id": cfg.model_id, "dtypes": device_dtypes, "max_new_tokens": cfg.max_new_tokens,
                  "precisions": {d: DTYPES[d].precision for d in cfg.dtypes},
                  "eos_token_id": model_info["eos_token_id"], "versions": page["versions"],
                  "files": {d: f"models/{cfg.model_id}/onnx/{p['file']}" for d, p in placed.items()}}
        place_bundle(tmp, out_dir, bundle, BUNDLE_FILE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    primary = cfg.primary
    files = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())
    model_bytes = sum(p["bytes"] for p in placed.values())
    return {
        "format": "webgpu",
        "precision": DTYPES[primary].precision,
        "dtypes": list(cfg.dtypes),
        "device_dtypes": device_dtypes,
        "export_config": cfg.to_dict(),
        "model_id": cfg.model_id,
        "graphs": graphs,
        "files": files,
        "sizes_mb": {"models": model_bytes / 2**20, "page_and_runtime": page["bytes"] / 2**20,
                     **{d: p["bytes"] / 2**20 for d, p in placed.items()}},
        "versions": page["versions"],
        "chat_template": model_info["chat_template"],
        "eos_token_id": model_info["eos_token_id"],
        "warnings": warnings,
        "runtime_options": {"model_file": f"models/{cfg.model_id}/onnx/{onnx_name(primary)}"},
    }
