"""Activation ranges for int8 with static activations, measured on the shared calibration sample.

Static int8 quantises each linear layer's input with a fixed scale and zero point chosen before
deployment (onnxruntime's MinMax calibration: the observed minimum and maximum), instead of
computing them per call. The ranges are collected with forward hooks on the merged model in
torch, run over the calibration batches (``toolchain.stages.calibrate.calibration_sample``), and keyed by
the fused graph's linear names (``layers.{i}/attn/qkv``, ``layers.{i}/attn/o``,
``layers.{i}/mlp/gate_up``, ``layers.{i}/mlp/down``). Modules that feed the same fused linear
(q/k/v, gate/up) see the same input.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from .families import DecoderSpec

# Hugging Face projection module name -> the fused graph's linear for that input
MODULE_TO_LINEAR = {
    "q_proj": "attn/qkv", "qkv_proj": "attn/qkv",
    "o_proj": "attn/o",
    "gate_proj": "mlp/gate_up", "gate_up_proj": "mlp/gate_up",
    "down_proj": "mlp/down",
}
# Linears whose inputs keep run-time (dynamic) scales even under `activations: static`: the
# SwiGLU product feeding down_proj carries the outliers that one fixed per-tensor range cannot
# hold. Measured on the fine-tuned quickstart model (KL / top-1 against the merged model):
# all static 1.15 / 0.49; down_proj dynamic 0.075 / 0.81; everything dynamic 0.005 / 0.95.
KEEP_DYNAMIC = ("mlp/down",)
LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.([a-z_]+)$")


def activation_ranges(model_dir: str | Path, calibration: str | Path, spec: DecoderSpec) -> dict[str, tuple[float, float]]:
    """``{linear name: (min, max)}`` of every quantised linear's input over the calibration tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    batches = json.loads(Path(calibration).read_text())["batches"]
    if not batches:
        raise ValueError(f"{calibration}: the calibration sample has no batches (fix: give the recipe's "
                         f"`calibrate` section more samples or a dataset)")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ranges: dict[str, list[float]] = {}

    def hook_for(key: str):
        def hook(_module, args):
            x = args[0].detach()
            lo, hi = float(x.min()), float(x.max())
            seen = ranges.setdefault(key, [lo, hi])
            seen[0], seen[1] = min(seen[0], lo), max(seen[1], hi)
        return hook

    handles = []
    for name, module in model.named_modules():
        m = LAYER.search(name)
        if m and m[2] in MODULE_TO_LINEAR:
            handles.append(module.register_forward_pre_hook(hook_for(f"layers.{m[1]}/{MODULE_TO_LINEAR[m[2]]}")))
    try:
        with torch.no_grad():
            for batch in batches:
                model(torch.tensor([batch]))
    finally:
        for h in handles:
            h.remove()
    expected = {f"layers.{i}/{kind}" for i in range(spec.num_layers) for kind in set(MODULE_TO_LINEAR.values())}
    missing = sorted(expected - set(ranges))
    if missing:
        raise ValueError(f"calibration saw no input for {len(missing)} linear layer(s), e.g. {missing[0]}: the "
                         f"model's module names are not the ones this calibrator knows ({sorted(MODULE_TO_LINEAR)})")
    return {k: (v[0], v[1]) for k, v in ranges.items() if not k.endswith(KEEP_DYNAMIC)}


# the fused graph's linear (per layer) -> the importance-matrix tensor holding its input statistics,
# first match wins (llama.cpp names; phi3 keeps q/k/v and gate/up fused)
IMATRIX_SOURCES = {
    "attn/qkv": ("attn_q", "attn_qkv"),
    "attn/o": ("attn_output",),
    "mlp/gate_up": ("ffn_gate", "ffn_up"),
    "mlp/down": ("ffn_down",),
}


def importance_from_imatrix(path: str | Path, spec: DecoderSpec) -> dict:
    """``{linear name: mean x^2 per input column}`` from the run's importance matrix (the GGUF
    imatrix file the ``imatrix`` stage writes), keyed by the fused graph's linear names."""
    import numpy as np

    from toolchain.core.imatrix import load_imatrix

    data = load_imatrix(path)
    out, missing = {}, []
    for i in range(spec.num_layers):
        for linear, sources in IMATRIX_SOURCES.items():
            found = next((data[f"blk.{i}.{s}.weight"] for s in sources if f"blk.{i}.{s}.weight" in data), None)
            if found is None:
                missing.append(f"layers.{i}/{linear}")
                continue
            sum2, count = found
            out[f"layers.{i}/{linear}"] = (np.asarray(sum2) / max(count, 1)).astype(np.float32)
    if "output.weight" in data:
        sum2, count = data["output.weight"]
        out["lm_head"] = (np.asarray(sum2) / max(count, 1)).astype(np.float32)
    if missing:
        raise ValueError(f"{path}: the importance matrix has no entry for {len(missing)} linear layer(s), "
                         f"e.g. {missing[0]} (fix: recompute it for this model)")
    return out
