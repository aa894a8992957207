"""Phi3 family (Phi3ForCausalLM: Phi-3 4k, Phi-4-mini without LongRoPE).

What differs from Llama:
- the checkpoint holds fused projections: ``qkv_proj`` (rows: q, then k, then v) and
  ``gate_up_proj`` (rows: gate, then up); they are split here into the Llama roles (the fused
  graph joins them again);
- the rotary embedding may turn only the first ``partial_rotary_factor * head_dim`` values of
  each head (read from ``rope_parameters``, where transformers 5 keeps it, or the top level);
- ``sliding_window``, when set, applies to every layer: transformers 5.24's Phi3Model builds
  its sliding-window mask whenever ``config.sliding_window`` is not None (Phi-3-mini-4k: 2047).

LongRoPE (``rope_type: longrope``, also written ``su`` or ``yarn``: Phi-3 128k, Phi-3.5,
Phi-4-mini) switches between two sets of frequencies by sequence length; it is refused.
"""
from __future__ import annotations

from pathlib import Path

from exporters.hf import positive_int, refuse
from exporters.hf import read_rope as hf_read_rope

from . import DecoderSpec, DecoderWeights
from .common import Tensor, check_model_type, default_rope, load_decoder, read_common

MODEL_TYPES = ("phi3",)
LONGROPE_NAMES = ("longrope", "su", "yarn")  # transformers maps all three to longrope for phi3
NORMS = {"input_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm"}


def read_spec(config: dict) -> DecoderSpec:
    check_model_type(config, MODEL_TYPES, "Phi3")
    common = read_common(config)
    rope = hf_read_rope(config)
    if rope.rope_type in LONGROPE_NAMES:
        raise refuse("the rope type must be 'default' for the ONNX exporter's phi3 (LongRoPE, used by Phi-3 128k, "
                     "Phi-3.5 and Phi-4-mini, is not implemented)", rope.rope_type,
                     "export this model with the GGUF target, or file an issue asking for LongRoPE in ONNX")
    theta, theta_source = default_rope(config)
    partial = rope.params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if isinstance(partial, bool) or not isinstance(partial, int | float) or not 0 < partial <= 1:
        raise refuse("`partial_rotary_factor` must be a number in (0, 1]", partial, "fix config.json")
    rotary = int(common["head_dim"] * partial)  # as transformers truncates it
    if rotary % 2 or rotary <= 0:
        raise refuse("`partial_rotary_factor` x `head_dim` must be a positive even number", rotary, "fix config.json")
    window = config.get("sliding_window")
    if window is not None:
        window = positive_int(config, "sliding_window")
    return DecoderSpec(**common, rope_theta=theta, rope_theta_source=theta_source, sliding_window=window,
                       rotary_dim=None if rotary == common["head_dim"] else rotary)


def layer_tensors(spec: DecoderSpec) -> list[Tensor]:
    h, d, f = spec.hidden_size, spec.head_dim, spec.intermediate_size
    q_out, kv_out = spec.num_heads * d, spec.num_kv_heads * d
    return [
        Tensor("self_attn.qkv_proj.weight", (q_out + 2 * kv_out, h), ("q", "k", "v"), rows=(q_out, kv_out, kv_out)),
        Tensor("self_attn.o_proj.weight", (h, q_out), ("o",)),
        Tensor("mlp.gate_up_proj.weight", (2 * f, h), ("gate", "up"), rows=(f, f)),
        Tensor("mlp.down_proj.weight", (h, f), ("down",)),
        *[Tensor(f"{path}.weight", (h,), (role,)) for role, path in NORMS.items()],
    ]


def load_weights(model_dir: str | Path, spec: DecoderSpec) -> DecoderWeights:
    return load_decoder(model_dir, spec, layer_tensors(spec))

