"""Qwen2 family for GGUF: Qwen2ForCausalLM (Qwen2, Qwen2.5).

llama.cpp's QWEN2 graph uses NEOX rope (rotate-half), the Hugging Face layout, so q and k are
written as they are. Qwen2 always has q/k/v biases and no output-projection bias.
"""
from __future__ import annotations

import gguf

from ..tables import ROPE_DEFAULT, ROPE_LINEAR
from . import (
    Entry,
    Hparams,
    decoder_entries,
    read_common,
    refuse,
    require_head_dim_product,
    skipped_tied_head,
    write_hparams_linear_rope,
)

MODEL_TYPES = ("qwen2",)
ARCH = gguf.MODEL_ARCH.QWEN2
T = gguf.MODEL_TENSOR
ROPE_TYPES = (ROPE_DEFAULT, ROPE_LINEAR)


def read_hparams(config: dict) -> Hparams:
    hp = read_common(config, ARCH)
    if hp.rope.rope_type not in ROPE_TYPES:
        raise refuse(f"rope type must be one of {ROPE_TYPES} for the GGUF qwen2 architecture", hp.rope.rope_type,
                     "export a model without this rope scaling, or file an issue asking for it")
    if hp.rope.rope_type == ROPE_LINEAR and not hp.rope.params.get("factor"):
        raise refuse("linear rope scaling needs a `factor`", hp.rope.params, "fix config.json")
    require_head_dim_product(hp)
    if config.get("use_sliding_window"):
        raise refuse("`use_sliding_window` must be false: llama.cpp's qwen2 architecture has no sliding window",
                     True, "export a model trained without a sliding window")
    return hp


def tensor_entries(hp: Hparams, names: set[str]) -> list[Entry]:
    h, f = hp.hidden_size, hp.intermediate_size
    kv_out = hp.num_kv_heads * hp.head_dim
    table = [
        ("input_layernorm.weight", T.ATTN_NORM, "weight", (h,), None),
        ("self_attn.q_proj.weight", T.ATTN_Q, "weight", (h, h), None),
        ("self_attn.q_proj.bias", T.ATTN_Q, "bias", (h,), None),
        ("self_attn.k_proj.weight", T.ATTN_K, "weight", (kv_out, h), None),
        ("self_attn.k_proj.bias", T.ATTN_K, "bias", (kv_out,), None),
        ("self_attn.v_proj.weight", T.ATTN_V, "weight", (kv_out, h), None),
        ("self_attn.v_proj.bias", T.ATTN_V, "bias", (kv_out,), None),
        ("self_attn.o_proj.weight", T.ATTN_OUT, "weight", (h, h), None),
        ("post_attention_layernorm.weight", T.FFN_NORM, "weight", (h,), None),
        ("mlp.gate_proj.weight", T.FFN_GATE, "weight", (f, h), None),
        ("mlp.up_proj.weight", T.FFN_UP, "weight", (f, h), None),
        ("mlp.down_proj.weight", T.FFN_DOWN, "weight", (h, f), None),
    ]
    return decoder_entries(hp, table)


skipped = skipped_tied_head


write_hparams = write_hparams_linear_rope


def extra_tensors(hp: Hparams) -> list:
    return []
