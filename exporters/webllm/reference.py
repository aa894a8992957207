"""An independent check of MLC weights: a NumPy forward pass that reads only the MLC files.

It loads the tensor cache with the pure-NumPy loader, dequantises per the QuantSpec
(``(q - 7) * scale`` in the model dtype), and runs mlc-llm's Llama / Qwen2 graph in float32:
RMSNorm, fused qkv (plus Qwen2's bias) split into q, k, v rows, rotary embedding in the
rotate-half convention (mlc-llm's ``RopeMode.NORMAL``, the same as Hugging Face, which is why
mlc-llm loads HF q/k weights unpermuted) with base ``position_embedding_base`` / ``rope_theta``,
causal grouped-query attention scaled by ``head_dim ** -0.5``, ``act(gate) * up`` from the fused
``gate_up_proj`` (gate rows first), the final norm, and the lm_head (the embedding when tied).

Precision: the reference computes in float32 after dequantising, so it checks the weights
(names, fusions, layout, quantisation) and not the kernels' arithmetic. mlc-llm's q0f16 and
q4f16_1 graphs compute activations in float16 (the model dtype; the lm_head matmul and the
logits are float32), q0f32 and q4f32_1 in float32; the browser-side check covers that.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .families import FAMILIES
from .quant import dequantize_group, quant_spec
from .tensor_cache import load_tensor_cache
from .weights import Q_SCALE, Q_WEIGHT, is_quantised, quantised_names

# qwen2's ACT2FN in mlc-llm; llama is SiLU
ACTIVATIONS = {
    "silu": lambda x: x / (1.0 + np.exp(-x)),
    "swish": lambda x: x / (1.0 + np.exp(-x)),
    "relu": lambda x: np.maximum(x, 0.0),
    "gelu": lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
    "gelu_new": lambda x: 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3))),
}
_erf = np.vectorize(math.erf, otypes=[np.float32])


class MLCWeights:
    """Dequantised float32 views of an MLC weight folder, by the unquantised parameter name."""

    def __init__(self, weights_dir: str | Path, model_type: str, model_config: dict, quant: str):
        self.spec = quant_spec(quant)
        self.family = FAMILIES[model_type]
        self.params = {p.name: p for p in self.family.params(model_config)}
        self.raw, self.metadata = load_tensor_cache(weights_dir)

    def get(self, name: str) -> np.ndarray:
        p = self.params[name]
        if is_quantised(p, self.spec):
            qw, qs = quantised_names(name)
            return dequantize_group(self.raw[qw], self.raw[qs], self.spec, in_features=p.shape[1])
        return self.raw[name].astype(np.float32)

    def embedding_rows(self, ids: np.ndarray) -> np.ndarray:
        name = "model.embed_tokens.weight"
        p = self.params[name]
        if is_quantised(p, self.spec):
            base = name.rsplit(".", 1)[0]
            qw, qs = self.raw[f"{base}.{Q_WEIGHT}"][ids], self.raw[f"{base}.{Q_SCALE}"][ids]
            return dequantize_group(qw, qs, self.spec, in_features=p.shape[1])
        return self.raw[name][ids].astype(np.float32)


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    var = np.mean(x.astype(np.float32) ** 2, axis=-1, keepdims=True)
    return (x / np.sqrt(var + np.float32(eps))) * w


def rope_tables(n: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    inv = 1.0 / (float(theta) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    ang = np.arange(n, dtype=np.float64)[:, None] * inv[None, :]
    ang = np.concatenate([ang, ang], axis=-1)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [heads, n, d]: rotate-half (first half with second half of each head)."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[None] + rotated * sin[None]


def _config_values(model_type: str, cfg: dict) -> dict:
    theta = cfg["position_embedding_base"] if model_type == "llama" else cfg["rope_theta"]
    return {"theta": theta, "act": cfg.get("hidden_act", "silu"), "bias": model_type == "qwen2",
            "qkv": "qkv_proj" if model_type == "llama" else "c_attn"}


def reference_logits(weights_dir: str | Path, model_config: dict, model_type: str, quant: str,
                     ids: list[int]) -> np.ndarray:
    """Logits ``[len(ids), vocab]`` (float32) of the MLC weights in ``weights_dir`` for ``ids``."""
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} has no reference forward; known: {', '.join(FAMILIES)}")
    cfg, v = model_config, _config_values(model_type, model_config)
    weights = MLCWeights(weights_dir, model_type, cfg, quant)
    ids_arr = np.asarray(ids, dtype=np.int64)
    n, d = len(ids_arr), cfg["head_dim"]
    hq, hkv, eps = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["rms_norm_eps"]
    act = ACTIVATIONS[v["act"]]
    cos, sin = rope_tables(n, d, v["theta"])
    mask = np.triu(np.full((n, n), -np.inf, dtype=np.float32), k=1)
    x = weights.embedding_rows(ids_arr)
    for i in range(cfg["num_hidden_layers"]):
        p, a, m = f"model.layers.{i}", f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        h = rms_norm(x, weights.get(f"{p}.input_layernorm.weight"), eps)
        qkv = h @ weights.get(f"{a}.{v['qkv']}.weight").T
        if v["bias"]:
            qkv = qkv + weights.get(f"{a}.{v['qkv']}.bias")
        q = qkv[:, :hq * d].reshape(n, hq, d).transpose(1, 0, 2)
        k = qkv[:, hq * d:(hq + hkv) * d].reshape(n, hkv, d).transpose(1, 0, 2)
        val = qkv[:, (hq + hkv) * d:].reshape(n, hkv, d).transpose(1, 0, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        group = hq // hkv
        k, val = np.repeat(k, group, axis=0), np.repeat(val, group, axis=0)
        scores = (q @ k.transpose(0, 2, 1)) * np.float32(d ** -0.5) + mask
        scores = scores - scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        attn = (probs @ val).transpose(1, 0, 2).reshape(n, hq * d)
        x = x + attn @ weights.get(f"{a}.o_proj.weight").T
        h = rms_norm(x, weights.get(f"{p}.post_attention_layernorm.weight"), eps)
        gate_up = h @ weights.get(f"{m}.gate_up_proj.weight").T
        f = cfg["intermediate_size"]
        x = x + (act(gate_up[:, :f]) * gate_up[:, f:]) @ weights.get(f"{m}.down_proj.weight").T
    x = rms_norm(x, weights.get("model.norm.weight"), eps)
    head = "model.embed_tokens.weight" if cfg["tie_word_embeddings"] else "lm_head.weight"
    return (x @ weights.get(head).T).astype(np.float32)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def logit_agreement(ref: np.ndarray, test: np.ndarray) -> dict:
    """max |logit difference|, mean KL(ref || test) of next-token distributions, top-1 agreement."""
    lp, lq = _log_softmax(ref), _log_softmax(test)
    kl = float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))
    return {"max_abs": float(np.max(np.abs(ref - test))), "kl": kl,
            "top1": float(np.mean(ref.argmax(-1) == test.argmax(-1))), "tokens": int(ref.shape[0])}


def torch_logits(hf_model_dir: str | Path, ids: list[int]) -> np.ndarray:
    """The merged model's float32 logits for ``ids`` (transformers, CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(torch.tensor([list(ids)], dtype=torch.long)).logits[0]
    return out.float().numpy()


def compare(weights_dir: str | Path, hf_model_dir: str | Path, quant: str, ids: list[int],
            model_config: dict | None = None) -> dict:
    """Reference logits of the MLC weights against the merged torch model (fp32): max_abs, kl, top1."""
    from exporters.hf import read_config

    from .families import family_for

    hf_config = read_config(hf_model_dir)
    family = family_for(hf_config)
    cfg = model_config or family.model_config(hf_config)
    ref = torch_logits(hf_model_dir, ids)
    mine = reference_logits(weights_dir, cfg, family.name, quant, ids)
    return {"quant": quant, **logit_agreement(ref, mine)}
