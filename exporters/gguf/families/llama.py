"""Llama family for GGUF: LlamaForCausalLM (SmolLM2 included) and MistralForCausalLM.

llama.cpp's LLAMA architecture applies rope to adjacent pairs (rope type NORM) while Hugging
Face rotates the two halves of each head, so q and k projections (and their biases) are
re-ordered row-wise (``rope_interleave``). Mistral is the same graph in llama.cpp; its sliding
window is not implemented there, which only matters beyond the window.
"""
from __future__ import annotations

from functools import partial

import gguf

from ..tables import ROPE_DEFAULT, ROPE_LINEAR, ROPE_LLAMA3
from . import (
    Entry,
    Hparams,
    decoder_entries,
    gguf_name,
    llama3_rope_factors,
    positive_int,
    read_common,
    refuse,
    rope_interleave,
    skipped_tied_head,
    write_hparams_linear_rope,
)

MODEL_TYPES = ("llama", "mistral")
ARCH = gguf.MODEL_ARCH.LLAMA
T = gguf.MODEL_TENSOR
ROPE_TYPES = (ROPE_DEFAULT, ROPE_LINEAR, ROPE_LLAMA3)


def read_hparams(config: dict) -> Hparams:
    hp = read_common(config, ARCH)
    if hp.rope.rope_type not in ROPE_TYPES:
        raise refuse(f"rope type must be one of {ROPE_TYPES} for the GGUF llama architecture", hp.rope.rope_type,
                     "export a model without this rope scaling, or file an issue asking for it")
    if hp.rope.rope_type == ROPE_LINEAR and not hp.rope.params.get("factor"):
        raise refuse("linear rope scaling needs a `factor`", hp.rope.params, "fix config.json")
    if hp.head_dim % 2:
        raise refuse("`head_dim` must be even for rotary embeddings", hp.head_dim, "fix config.json")
    hp.extra.update(attention_bias=bool(config.get("attention_bias", False)),
                    mlp_bias=bool(config.get("mlp_bias", False)))
    window = config.get("sliding_window") if hp.model_type == "mistral" else None
    if window is not None:
        window = positive_int(config, "sliding_window")
        if window < hp.context_length:
            hp.extra["warnings"] = [
                f"sliding_window {window} is not implemented by llama.cpp's llama architecture: the GGUF model "
                f"attends to the whole context, identical to the Hugging Face model up to {window} tokens"]
    hp.extra["sliding_window"] = window
    return hp


def _layer_table(hp: Hparams) -> list[tuple]:
    h, d, f = hp.hidden_size, hp.head_dim, hp.intermediate_size
    q_out, kv_out = hp.num_heads * d, hp.num_kv_heads * d
    q_perm = partial(rope_interleave, n_heads=hp.num_heads)
    k_perm = partial(rope_interleave, n_heads=hp.num_kv_heads)
    table = [
        ("input_layernorm.weight", T.ATTN_NORM, "weight", (h,), None),
        ("self_attn.q_proj.weight", T.ATTN_Q, "weight", (q_out, h), q_perm),
        ("self_attn.k_proj.weight", T.ATTN_K, "weight", (kv_out, h), k_perm),
        ("self_attn.v_proj.weight", T.ATTN_V, "weight", (kv_out, h), None),
        ("self_attn.o_proj.weight", T.ATTN_OUT, "weight", (h, q_out), None),
        ("post_attention_layernorm.weight", T.FFN_NORM, "weight", (h,), None),
        ("mlp.gate_proj.weight", T.FFN_GATE, "weight", (f, h), None),
        ("mlp.up_proj.weight", T.FFN_UP, "weight", (f, h), None),
        ("mlp.down_proj.weight", T.FFN_DOWN, "weight", (h, f), None),
    ]
    if hp.extra["attention_bias"]:
        table += [
            ("self_attn.q_proj.bias", T.ATTN_Q, "bias", (q_out,), q_perm),
            ("self_attn.k_proj.bias", T.ATTN_K, "bias", (kv_out,), k_perm),
            ("self_attn.v_proj.bias", T.ATTN_V, "bias", (kv_out,), None),
            ("self_attn.o_proj.bias", T.ATTN_OUT, "bias", (h,), None),
        ]
    if hp.extra["mlp_bias"]:
        table += [
            ("mlp.gate_proj.bias", T.FFN_GATE, "bias", (f,), None),
            ("mlp.up_proj.bias", T.FFN_UP, "bias", (f,), None),
            ("mlp.down_proj.bias", T.FFN_DOWN, "bias", (h,), None),
        ]
    return table


def tensor_entries(hp: Hparams, names: set[str]) -> list[Entry]:
    return decoder_entries(hp, _layer_table(hp))


skipped = skipped_tied_head


write_hparams = write_hparams_linear_rope


def extra_tensors(hp: Hparams) -> list[tuple[str, object]]:
    if hp.rope.rope_type == ROPE_LLAMA3:
        return [(gguf_name(T.ROPE_FREQS), llama3_rope_factors(hp))]
    return []
