"""Phi3 family for GGUF: Phi3ForCausalLM (Phi-3, Phi-3.5, Phi-4-mini).

Phi3 checkpoints already hold fused projections, and llama.cpp's PHI3 graph takes them fused:
``qkv_proj`` ([q; k; v] rows) becomes ``attn_qkv`` and ``gate_up_proj`` ([gate; up] rows)
becomes ``ffn_up``, which llama.cpp splits in the same order (SwiGLU, gate first). Rope is NEOX
(rotate-half), possibly partial (``partial_rotary_factor``), and may use LongRoPE factors,
written as the ``rope_factors_long`` / ``rope_factors_short`` tensors.
"""
from __future__ import annotations

import math

import gguf
import numpy as np

from ..tables import ROPE_DEFAULT
from . import (
    Entry,
    Hparams,
    decoder_entries,
    gguf_name,
    positive_int,
    read_common,
    refuse,
    require_head_dim_product,
    skipped_tied_head,
    write_common_hparams,
)

MODEL_TYPES = ("phi3",)
ARCH = gguf.MODEL_ARCH.PHI3
T = gguf.MODEL_TENSOR
ROPE_LONGROPE = "longrope"
ROPE_TYPES = (ROPE_DEFAULT, ROPE_LONGROPE)


def read_hparams(config: dict) -> Hparams:
    hp = read_common(config, ARCH)
    require_head_dim_product(hp)
    rope = hp.rope
    if rope.rope_type not in ROPE_TYPES:
        raise refuse(f"rope type must be one of {ROPE_TYPES} for the GGUF phi3 architecture", rope.rope_type,
                     "file an issue asking for this rope scaling")
    partial = float(rope.params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))
    hp.rope_dims = int(hp.head_dim * partial)
    if hp.rope_dims % 2 or hp.rope_dims <= 0:
        raise refuse("`partial_rotary_factor` x `head_dim` must be a positive even number", hp.rope_dims,
                     "fix config.json")
    # transformers 5 lets the top-level key override the one inside rope_parameters
    orig_ctx = config.get("original_max_position_embeddings", rope.params.get("original_max_position_embeddings"))
    warnings = []
    if rope.rope_type == ROPE_LONGROPE:
        long_f, short_f = rope.params.get("long_factor"), rope.params.get("short_factor")
        if not (isinstance(long_f, list) and isinstance(short_f, list)
                and len(long_f) == len(short_f) == hp.rope_dims // 2):
            raise refuse(f"longrope needs `long_factor` and `short_factor` lists of {hp.rope_dims // 2} numbers",
                         {"long_factor": long_f, "short_factor": short_f}, "fix config.json")
        orig_ctx = positive_int({"original_max_position_embeddings": orig_ctx}, "original_max_position_embeddings")
        scale = float(rope.params.get("factor") or hp.context_length / orig_ctx)  # as transformers reads it
        attn = rope.params.get("attention_factor")
        if attn is None:
            attn = math.sqrt(1 + math.log(scale) / math.log(orig_ctx)) if scale > 1.0 else 1.0
        hp.extra.update(rope_factors_long=[float(x) for x in long_f], rope_factors_short=[float(x) for x in short_f],
                        rope_attn_factor=float(attn))
        warnings.append(f"llama.cpp picks the long rope factors whenever its context (n_ctx, rounded up to a "
                        f"multiple of 256) exceeds {orig_ctx} tokens, Hugging Face only once the sequence does; "
                        f"with a longer context, short prompts get the long factors in llama.cpp")
    window = config.get("sliding_window")
    if window is not None and window < hp.context_length:
        warnings.append(f"sliding_window {window} is disabled in llama.cpp's phi3: identical to the Hugging Face "
                        f"model up to {window} tokens")
    hp.extra.update(original_context_length=orig_ctx, sliding_window=window, partial_rotary_factor=partial)
    if warnings:
        hp.extra["warnings"] = warnings
    return hp


def tensor_entries(hp: Hparams, names: set[str]) -> list[Entry]:
    h, f = hp.hidden_size, hp.intermediate_size
    qkv_out = h + 2 * hp.num_kv_heads * hp.head_dim
    table = [
        ("input_layernorm.weight", T.ATTN_NORM, "weight", (h,), None),
        ("self_attn.qkv_proj.weight", T.ATTN_QKV, "weight", (qkv_out, h), None),
        ("self_attn.o_proj.weight", T.ATTN_OUT, "weight", (h, h), None),
        ("post_attention_layernorm.weight", T.FFN_NORM, "weight", (h,), None),
        ("mlp.gate_up_proj.weight", T.FFN_UP, "weight", (2 * f, h), None),
        ("mlp.down_proj.weight", T.FFN_DOWN, "weight", (h, f), None),
    ]
    return decoder_entries(hp, table)


skipped = skipped_tied_head


def write_hparams(writer: gguf.GGUFWriter, hp: Hparams) -> None:
    write_common_hparams(writer, hp)
    if hp.extra["original_context_length"]:
        writer.add_rope_scaling_orig_ctx_len(int(hp.extra["original_context_length"]))
    # llama.cpp tells Phi-4 (no window) from Phi-3 by a zero sliding window
    writer.add_sliding_window(int(hp.extra["sliding_window"] or 0))
    if hp.rope.rope_type == ROPE_LONGROPE:
        writer.add_rope_scaling_attn_factors(hp.extra["rope_attn_factor"])


def extra_tensors(hp: Hparams) -> list[tuple[str, np.ndarray]]:
    if hp.rope.rope_type != ROPE_LONGROPE:
        return []
    return [(gguf_name(T.ROPE_FACTORS_LONG), np.asarray(hp.extra["rope_factors_long"], dtype=np.float32)),
            (gguf_name(T.ROPE_FACTORS_SHORT), np.asarray(hp.extra["rope_factors_short"], dtype=np.float32))]
