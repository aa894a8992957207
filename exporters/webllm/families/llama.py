"""Llama as mlc-llm models it (``model_type`` "llama"): LlamaForCausalLM, SmolLM2 included.

mlc-llm's LlamaConfig fields, in order, with its defaults: ``position_embedding_base`` from
``rope_theta`` (read here from either config layout: transformers 5 keeps it under
``rope_parameters``, where mlc-llm would miss it and fall back to 10000), ``context_window_size``
from ``max_position_embeddings``, ``prefill_chunk_size = min(context, 8192)``,
``num_key_value_heads`` = heads when absent, ``head_dim = hidden // heads`` when absent.
The graph: fused ``qkv_proj`` (rows q, k, v) and ``gate_up_proj`` (rows gate, up), no biases,
SiLU, RMSNorm, rotate-half rope (as Hugging Face), attention scale ``head_dim ** -0.5``.
"""
from __future__ import annotations

from exporters.hf import positive_int, refuse

from .common import (
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

PREFILL_CAP = 8192  # LlamaConfig.__post_init__: min(context_window_size, 8192)
ACTIVATIONS = ("silu",)  # mlc-llm's LlamaFFN hard-codes SiLU


def model_config(hf_config: dict, *, context_window_size: int | None = None, prefill_chunk_size: int | None = None,
                 max_batch_size: int | None = None) -> dict:
    for key in ("attention_bias", "mlp_bias"):
        if hf_config.get(key):
            raise refuse(f"`{key}` must be false: mlc-llm's Llama graph has no biases", True,
                         "export this model to another target")
    act = hf_config.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise refuse(f"`hidden_act` must be one of {ACTIVATIONS} for mlc-llm's Llama graph", act,
                     "export this model to another target")
    hidden, heads = positive_int(hf_config, "hidden_size"), positive_int(hf_config, "num_attention_heads")
    if hidden % heads:
        raise refuse(f"`hidden_size` ({hidden}) must be a multiple of `num_attention_heads` for mlc-llm's Llama",
                     heads, "fix config.json")
    kv_heads = positive_int(hf_config, "num_key_value_heads", heads)
    check_heads(heads, kv_heads)
    head_dim = hf_config.get("head_dim") or hidden // heads
    cfg = {
        "hidden_size": hidden,
        "intermediate_size": positive_int(hf_config, "intermediate_size"),
        "num_attention_heads": heads,
        "num_hidden_layers": positive_int(hf_config, "num_hidden_layers"),
        "rms_norm_eps": float(hf_config.get("rms_norm_eps", 1e-6)),
        "vocab_size": positive_int(hf_config, "vocab_size"),
        "tie_word_embeddings": bool(hf_config.get("tie_word_embeddings", False)),
        "position_embedding_base": effective_rope_theta(hf_config),
        "rope_scaling": None,
        "context_window_size": context_window(hf_config),
        "prefill_chunk_size": 0,
        "num_key_value_heads": kv_heads,
        "head_dim": int(head_dim),
        "tensor_parallel_shards": 1,
        "pipeline_parallel_stages": 1,
        "max_batch_size": 1,
        "disaggregation": False,
    }
    return apply_overrides(cfg, {"context_window_size": context_window_size, "prefill_chunk_size": prefill_chunk_size,
                                 "max_batch_size": max_batch_size}, PREFILL_CAP)


def params(cfg: dict) -> list[Param]:
    h, d, f = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d

    def layer(i: int) -> list[Param]:
        p, a, m = f"model.layers.{i}", f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        return [
            Param(f"{a}.qkv_proj.weight", (q + 2 * kv, h), LINEAR,
                  (f"{a}.q_proj.weight", f"{a}.k_proj.weight", f"{a}.v_proj.weight")),
            Param(f"{a}.o_proj.weight", (h, q), LINEAR, (f"{a}.o_proj.weight",)),
            Param(f"{m}.gate_up_proj.weight", (2 * f, h), LINEAR, (f"{m}.gate_proj.weight", f"{m}.up_proj.weight")),
            Param(f"{m}.down_proj.weight", (h, f), LINEAR, (f"{m}.down_proj.weight",)),
            Param(f"{p}.input_layernorm.weight", (h,), NORM, (f"{p}.input_layernorm.weight",)),
            Param(f"{p}.post_attention_layernorm.weight", (h,), NORM, (f"{p}.post_attention_layernorm.weight",)),
        ]

    return decoder_params(cfg, layer)


FAMILY = Family(name="llama", architectures=("LlamaForCausalLM",), hf_model_types=("llama",),
                model_config=model_config, params=params,
                notes={"act": "silu", "qkv_bias": False, "rope_theta_key": "position_embedding_base"})
