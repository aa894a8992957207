"""Qwen2 as mlc-llm models it (``model_type`` "qwen2"): Qwen2ForCausalLM.

mlc-llm's QWen2Config fields, in order: ``rope_theta`` is required there (read here from either
config layout), ``prefill_chunk_size = min(context, 2048)``, ``head_dim = hidden // heads`` when
absent and ``head_dim * heads == hidden`` required, ``dtype`` recorded as "float32".
The graph: the fused attention projection is named ``c_attn`` (rows q, k, v) and has a bias;
``o_proj`` has none; ``gate_up_proj`` (rows gate, up); activation from ``hidden_act``.
mlc-llm's Qwen2 attends to the whole context (no sliding window).
"""
from __future__ import annotations

from exporters.hf import positive_int, refuse

from .common import (
    BIAS,
    LINEAR,
    NORM,
    Family,
    Param,
    apply_overrides,
    check_heads,
    context_window,
    decoder_params,
    effective_rope_theta,
)

PREFILL_CAP = 2048  # QWen2Config.__post_init__: min(context_window_size, 2048)
ACTIVATIONS = ("silu", "swish", "gelu", "gelu_new", "relu")  # mlc-llm's qwen2 ACT2FN keys


def model_config(hf_config: dict, *, context_window_size: int | None = None, prefill_chunk_size: int | None = None,
                 max_batch_size: int | None = None) -> dict:
    act = hf_config.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise refuse(f"`hidden_act` must be one of {ACTIVATIONS} for mlc-llm's Qwen2 graph", act,
                     "export this model to another target")
    hidden, heads = positive_int(hf_config, "hidden_size"), positive_int(hf_config, "num_attention_heads")
    kv_heads = positive_int(hf_config, "num_key_value_heads", heads)
    check_heads(heads, kv_heads)
    head_dim = int(hf_config.get("head_dim") or hidden // heads)
    if head_dim * heads != hidden:
        raise refuse(f"`head_dim` x `num_attention_heads` must equal `hidden_size` ({hidden}) for mlc-llm's Qwen2",
                     head_dim, "export this model to another target")
    ctx = context_window(hf_config)
    window = hf_config.get("sliding_window") if hf_config.get("use_sliding_window") else None
    if window is not None and window < (context_window_size or ctx):
        raise refuse(f"mlc-llm's Qwen2 has no sliding window; the context must not exceed `sliding_window` "
                     f"({window})", context_window_size or ctx,
                     f"set the WebLLM context_window_size to at most {window}")
    cfg = {
        "hidden_act": act,
        "hidden_size": hidden,
        "intermediate_size": positive_int(hf_config, "intermediate_size"),
        "num_attention_heads": heads,
        "num_hidden_layers": positive_int(hf_config, "num_hidden_layers"),
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": float(hf_config.get("rms_norm_eps", 1e-6)),
        "rope_theta": effective_rope_theta(hf_config),
        "vocab_size": positive_int(hf_config, "vocab_size"),
        "tie_word_embeddings": bool(hf_config.get("tie_word_embeddings", False)),
        "context_window_size": ctx,
        "prefill_chunk_size": 0,
        "tensor_parallel_shards": 1,
        "head_dim": head_dim,
        "dtype": "float32",
        "max_batch_size": 1,
    }
    return apply_overrides(cfg, {"context_window_size": context_window_size, "prefill_chunk_size": prefill_chunk_size,
                                 "max_batch_size": max_batch_size}, PREFILL_CAP)


def params(cfg: dict) -> list[Param]:
    h, d, f = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d

    def layer(i: int) -> list[Param]:
        p, a, m = f"model.layers.{i}", f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        return [
            Param(f"{a}.c_attn.weight", (q + 2 * kv, h), LINEAR,
                  (f"{a}.q_proj.weight", f"{a}.k_proj.weight", f"{a}.v_proj.weight")),
            Param(f"{a}.c_attn.bias", (q + 2 * kv,), BIAS,
                  (f"{a}.q_proj.bias", f"{a}.k_proj.bias", f"{a}.v_proj.bias")),
            Param(f"{a}.o_proj.weight", (h, q), LINEAR, (f"{a}.o_proj.weight",)),
            Param(f"{m}.gate_up_proj.weight", (2 * f, h), LINEAR, (f"{m}.gate_proj.weight", f"{m}.up_proj.weight")),
            Param(f"{m}.down_proj.weight", (h, f), LINEAR, (f"{m}.down_proj.weight",)),
            Param(f"{p}.input_layernorm.weight", (h,), NORM, (f"{p}.input_layernorm.weight",)),
            Param(f"{p}.post_attention_layernorm.weight", (h,), NORM, (f"{p}.post_attention_layernorm.weight",)),
        ]

    return decoder_params(cfg, layer)


FAMILY = Family(name="qwen2", architectures=("Qwen2ForCausalLM",), hf_model_types=("qwen2",),
                model_config=model_config, params=params,
                notes={"act_key": "hidden_act", "qkv_bias": True, "rope_theta_key": "rope_theta"})
