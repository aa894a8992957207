"""WebLLM bundle exporter (registry name ``webllm``): a static folder any web server can host,
which @mlc-ai/web-llm's own engine runs in the browser on WebGPU.

    index.html, app.js               the chat page (web/page-webllm) on WebLLM's engine
    vendor/web-llm/                  @mlc-ai/web-llm, vendored from web/node_modules
    app-config.json                  WebLLM's AppConfig: one model_list entry per quantisation
    models/<id>-<quant>-MLC/         MLC weights (params_shard_*.bin + tensor-cache.json),
                                     mlc-chat-config.json, tokenizer files
    libs/<id>-<quant>-webgpu.wasm    the WebGPU model library (apache-tvm + emscripten)
    bundle.json, README.txt

Weights, names and layouts are mlc-llm's (``families``, ``quant``, ``tensor_cache``), so the
folders also load with the official prebuilt library of the architecture. Every quantisation's
weights are read back by an independent NumPy forward pass (``reference``) and compared with the
merged model's logits before the bundle is written.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from exporters import place_bundle
from toolchain.core.errors import PreflightError

from .config import F16_QUANTS, WebllmExportConfig

__all__ = ["WebllmExportConfig", "export", "preflight"]

BUNDLE_FILE = "bundle.json"
APP_CONFIG = "app-config.json"
README = """edgesmith WebLLM bundle: {model_id}

Serve this folder with any static web server and open index.html, e.g.
    python3 -m http.server --bind 127.0.0.1 8000     ->  http://127.0.0.1:8000/

The page runs @mlc-ai/web-llm {webllm} (vendor/web-llm) on WebGPU and loads everything from
this folder: app-config.json lists one model per quantisation ({quants}). Quantisations ending
in f16 need an adapter with the 'shader-f16' feature. Weights without a model library here
({no_lib}) load with WebLLM's prebuilt library of the same architecture: set model_lib in
app-config.json.
"""


def _config(config) -> WebllmExportConfig:
    try:
        return WebllmExportConfig.coerce(config)
    except (ValueError, TypeError) as e:
        raise PreflightError(f"webllm export config: {e}") from None


def _hf_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def preflight(model_dir: str | Path, config=None) -> None:
    """Refuse, before any work, a model, setting or missing tool the bundle cannot be built with."""
    from exporters import require_tokenizer_files

    from .families import family_for
    from .vendor import check_installed

    cfg = _config(config)
    model_dir = Path(model_dir)
    require_tokenizer_files(model_dir, "webllm")
    family_for(_hf_config(model_dir))
    check_installed()
    if cfg.libraries and _compiler(cfg) == "edgesmith":
        from .library.toolchain import missing_tools

        tools = missing_tools()
        if tools:
            raise PreflightError(f"webllm export: compiling the model libraries {list(cfg.libraries)} needs "
                                 f"{'; '.join(tools)} (or `libraries: []` for weights and config only)")


def _compiler(cfg: WebllmExportConfig) -> str:
    if cfg.compiler != "auto":
        return cfg.compiler
    import importlib.util

    return "mlc_llm" if importlib.util.find_spec("mlc_llm") is not None else "edgesmith"


def _windows(cfg: WebllmExportConfig, model_config: dict) -> tuple[int, int]:
    from .config import DEFAULT_CONTEXT_CAP, DEFAULT_PREFILL_CHUNK

    model_ctx = int(model_config["context_window_size"])
    ctx = cfg.context_window_size or min(model_ctx, DEFAULT_CONTEXT_CAP)
    if ctx > model_ctx:
        raise PreflightError(f"webllm export: `context_window_size` {ctx} is longer than the model's "
                             f"{model_ctx} positions (fix: at most {model_ctx})")
    chunk = cfg.prefill_chunk_size or min(ctx, DEFAULT_PREFILL_CHUNK)
    if chunk > ctx:
        raise PreflightError(f"webllm export: `prefill_chunk_size` {chunk} exceeds the context window {ctx} "
                             f"(fix: at most {ctx})")
    return ctx, chunk


def vram_required_mb(model_config: dict, weight_bytes: int, quant: str, ctx: int, chunk: int) -> float:
    """WebLLM's vram_required_MB: weights + the KV cache for the whole window + prefill activations
    (the largest: one chunk's logits in float32 and its MLP intermediate)."""
    elem = 2 if quant in F16_QUANTS else 4
    heads = model_config["num_attention_heads"]
    kv_heads = model_config.get("num_key_value_heads") or heads
    head_dim = model_config.get("head_dim") or model_config["hidden_size"] // heads
    kv = model_config["num_hidden_layers"] * 2 * kv_heads * head_dim * ctx * elem
    act = chunk * (model_config["vocab_size"] * 4 + 4 * model_config["intermediate_size"] * elem)
    return round((weight_bytes + kv + act) / 2**20, 1)


def _reference_check(model_dir: Path, weights_dir: Path, model_type: str, model_config: dict, quant: str,
                     ids: list[int], ref_logprobs) -> dict:
    """The NumPy forward over the written MLC files against the merged model (shared gates table)."""
    import numpy as np

    from toolchain.core.metrics import log_softmax, quality_against
    from toolchain.quality.gates import verdict

    from .reference import reference_logits

    t = time.perf_counter()
    logits = reference_logits(weights_dir, model_config, model_type, quant, ids)
    q = quality_against(ref_logprobs, logits, ids, [], []).to_dict()
    q["max_abs_logprob"] = float(np.abs(log_softmax(logits) - ref_logprobs.astype(np.float64)).max())
    gate = verdict("webllm", quant, q)  # greedy is nan here: judged on logits only
    return {"quality": q, "gate": gate, "seconds": round(time.perf_counter() - t, 2)}


def _torch_reference(model_dir: Path, tokens: int) -> tuple[list[int], "object"]:
    """Reference ids and log-probs when the exporter runs outside a pipeline (no reference stage)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolchain.core.prompts import QUALITY_TEXT

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(QUALITY_TEXT)["input_ids"][:tokens]
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return ids, torch.log_softmax(logits, -1).numpy().astype(np.float32)


def _reference_inputs(model_dir: Path, reference: Path | None, tokens: int):
    import numpy as np

    if reference is not None and (Path(reference) / "reference.json").is_file():
        ref = json.loads((Path(reference) / "reference.json").read_text())
        ids = ref["quality_ids"][:tokens]
        return ids, np.load(Path(reference) / "logprobs.npy")[: len(ids)]
    return _torch_reference(model_dir, tokens)


def export(model_dir: str | Path, out_dir: str | Path, config=None, reference: str | Path | None = None) -> dict:
    """Write the bundle into ``out_dir``; returns its manifest. ``reference``: the pipeline's
    reference stage folder (its quality ids and log-probs); without it the merged model is run here."""
    from .chat_config import write_chat_config
    from .families import family_for
    from .vendor import app_config, app_config_entry, copy_page
    from .weights import convert

    cfg = _config(config)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    preflight(model_dir, cfg)
    hf_config = _hf_config(model_dir)
    family = family_for(hf_config)
    model_config = family.model_config(hf_config)
    ctx, chunk = _windows(cfg, model_config)
    model_config = dict(model_config, context_window_size=ctx, prefill_chunk_size=chunk)
    compiler = _compiler(cfg)
    if cfg.reference_check:
        ids, ref_logprobs = _reference_inputs(model_dir, reference, cfg.reference_tokens)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".bundle-", dir=out_dir))
    weights, checks, libraries, entries = {}, {}, {}, []
    try:
        for quant in cfg.quants:
            mid = cfg.mlc_model_id(quant)
            folder = tmp / "models" / mid
            t = time.perf_counter()
            summary = convert(model_dir, folder, quant, encoding=cfg.encoding(quant))
            chat = write_chat_config(model_dir, folder, model_type=family.model_type, quant=quant,
                                     model_config=model_config, context_window_size=ctx, prefill_chunk_size=chunk,
                                     conv_template=cfg.conv_template)
            weights[quant] = {"model_id": mid, "folder": f"models/{mid}", "convert_s": round(time.perf_counter() - t, 2),
                              **{k: summary[k] for k in ("param_count", "bytes", "bits_per_param", "files")
                                 if k in summary}}
            if cfg.reference_check:
                checks[quant] = _reference_check(model_dir, folder, family.model_type, model_config, quant, ids,
                                                 ref_logprobs)
        for quant in cfg.libraries:
            libraries[quant] = _build_library(compiler, family.model_type, model_config, quant,
                                              tmp / "libs" / cfg.lib_name(quant), folder=tmp / "models" /
                                              cfg.mlc_model_id(quant))
        for quant in cfg.quants:
            mb = vram_required_mb(model_config, weights[quant]["bytes"], quant, ctx, chunk)
            lib = f"libs/{cfg.lib_name(quant)}" if quant in libraries else None
            entries.append(app_config_entry(cfg.mlc_model_id(quant), f"models/{cfg.mlc_model_id(quant)}/", lib,
                                            quant, mb))
        (tmp / APP_CONFIG).write_text(json.dumps(app_config(entries), indent=2) + "\n")
        page = copy_page(tmp)
        no_lib = [q for q in cfg.quants if q not in libraries]
        (tmp / "README.txt").write_text(README.format(model_id=cfg.model_id, webllm=page["versions"].get(
            "@mlc-ai/web-llm", "?"), quants=", ".join(cfg.quants), no_lib=", ".join(no_lib) or "none"))
        bundle = {"model_id": cfg.model_id, "quants": list(cfg.quants), "libraries": sorted(libraries),
                  "primary": cfg.primary, "max_new_tokens": cfg.max_new_tokens, "versions": page["versions"],
                  "stop_token_ids": chat["conv_template"].get("stop_token_ids", []), "app_config": APP_CONFIG}
        place_bundle(tmp, out_dir, bundle, BUNDLE_FILE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    failed = {q: c["gate"]["failures"] for q, c in checks.items() if not c["gate"]["passed"]}
    files = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())
    return {
        "format": "webllm",
        "precision": cfg.primary,
        "quants": list(cfg.quants),
        "export_config": cfg.to_dict(),
        "model_type": family.model_type,
        "model_config": model_config,
        "compiler": compiler,
        "weights": weights,
        "reference_check": checks,
        "libraries": libraries,
        "conv_template": chat["conv_template"],
        "files": files,
        "sizes_mb": {"page_and_runtime": page["bytes"] / 2**20,
                     **{q: w["bytes"] / 2**20 for q, w in weights.items()},
                     **{f"lib-{q}": lib["bytes"] / 2**20 for q, lib in libraries.items()}},
        "versions": page["versions"],
        "warnings": [f"{q}: NumPy reference check failed: {'; '.join(f)}" for q, f in failed.items()],
        "runtime_options": {"model_id": cfg.mlc_model_id(cfg.primary)},
    }


def _build_library(compiler: str, model_type: str, model_config: dict, quant: str, out_wasm: Path,
                   folder: Path) -> dict:
    """One WebGPU model library: edgesmith's apache-tvm compiler, or mlc_llm's when installed."""
    out_wasm.parent.mkdir(parents=True, exist_ok=True)
    if compiler == "mlc_llm":
        import subprocess
        import sys

        t = time.perf_counter()
        cmd = [sys.executable, "-m", "mlc_llm", "compile", str(folder / "mlc-chat-config.json"), "--device",
               "webgpu", "-o", str(out_wasm)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise PreflightError(f"webllm export: `{' '.join(cmd)}` failed (exit {proc.returncode}): "
                                 f"{proc.stderr.strip()[-800:]} (fix: compiler: edgesmith)")
        return {"compiler": "mlc_llm", "build_s": round(time.perf_counter() - t, 1), "bytes": out_wasm.stat().st_size,
                "file": f"libs/{out_wasm.name}", "cached": False}
    from .library.compile import compile_library

    info = compile_library(model_type, model_config, quant, out_wasm)
    memory = (info.get("metadata") or {}).get("memory_usage")
    return {"compiler": "edgesmith", "file": f"libs/{out_wasm.name}", "bytes": out_wasm.stat().st_size,
            "cached": bool(info.get("cached")), "key": info.get("key"),
            **{k: round(float(info[k]), 1) for k in ("build_s", "compile_s", "link_s") if info.get(k) is not None},
            **({"memory_usage": memory} if memory else {})}
