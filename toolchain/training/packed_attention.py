"""Attention that runs each packed example on its own.

transformers' default for a packed row (``attention_mask`` None, ``position_ids`` restarting) is a
block-diagonal boolean mask over the whole row: every layer then computes (and differentiates)
query x key scores for every pair of tokens in the row, most of them masked, and SDPA falls back
to its math kernel because a mask is given. Flash-attention's varlen kernels avoid both on CUDA;
there is no such kernel on the CPU.

``edgesmith_packed`` is an attention implementation registered with transformers'
``AttentionInterface`` (and its mask with ``AttentionMaskInterface``) that instead cuts the row at
the position-id restarts and calls SDPA with ``is_causal=True`` once per example: the scores of
pairs that cross examples are never computed, and SDPA's fused causal kernel runs (forward and
backward). Batches with a padding mask (dynamic padding, eval) get transformers' own SDPA mask
and attention unchanged, so the implementation is a drop-in for ``sdpa``.

``tests/toolchain/test_packing.py`` checks that a packed row's logits equal each example's own,
and ``benchmarks/train_speed.py`` measures what it gains.
"""
from __future__ import annotations

NAME = "edgesmith_packed"


def _segments(position_ids) -> list[int] | None:
    """Lengths of the examples of a one-row packed batch (position ids restarting at 0), else None."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1:
        return None
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        return None
    bounds = starts + [position_ids.shape[1]]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def packed_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """(batch, heads, len, dim) query/key/value -> ((batch, len, heads, dim) output, None)."""
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    lengths = _segments(kwargs.get("position_ids"))
    if (attention_mask is not None or not causal or lengths is None or kwargs.get("position_bias") is not None
            or query.shape[2] != key.shape[2]):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # the CPU's fused kernel takes no enable_gqa: repeat the KV heads (as sdpa does here)
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    if len(lengths) == 1:
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout, scale=scaling, is_causal=query.shape[2] > 1)
    else:
        parts = [torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, dropout_p=dropout, scale=scaling, is_causal=q.shape[2] > 1)
                 for q, k, v in zip(query.split(lengths, dim=2), key.split(lengths, dim=2),
                                    value.split(lengths, dim=2))]
        out = torch.cat(parts, dim=2)
    return out.transpose(1, 2).contiguous(), None


def packed_mask(*args, attention_mask=None, **kwargs):
    """No mask for a batch without padding (the attention cuts it at the restarts); else sdpa's."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> str:
    """Register ``edgesmith_packed`` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, packed_attention_forward)
    AttentionMaskInterface.register(NAME, packed_mask)
    return NAME


def use_packed_attention(model) -> bool:
    """Switch a causal LM that runs on sdpa to ``edgesmith_packed``; False where it does not apply
    (another implementation was chosen, or the model cannot switch)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    register()
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, AttributeError, NotImplementedError):
        return False
    return config._attn_implementation == NAME
