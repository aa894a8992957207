"""The causal-LM loss on the labelled positions only.

The model's own loss projects every position onto the full vocabulary (49,152 logits per token
on SmolLM2), padding and prompt tokens included, then drops the ignored ones. Here the model is
asked for the logits of the positions whose next-token label is kept (``logits_to_keep`` with a
boolean (batch, length) mask: transformers' ``slice_logits_to_keep`` selects the hidden states
before ``lm_head``), and the cross-entropy is taken over those. PEFT's causal-LM wrapper passes the
keyword through to the base model. A model whose forward has no ``logits_to_keep`` gets full
logits, selected afterwards (same value, no saving).

Normalisation: the sum over label tokens divided by ``num_items`` (the Trainer's count of label
tokens over the whole accumulated step, from ``shift_labels``) or, without it, by this batch's
own count: the token-weighted mean, the same for a packed row and a padded batch of the same
examples.
"""
from __future__ import annotations

import inspect

IGNORE = -100


def shifted_labels(inputs: dict):
    """The next-token targets of a batch: the collator's ``shift_labels``, else labels shifted per row."""
    import torch

    shift = inputs.get("shift_labels")
    if shift is not None:
        return shift
    labels = inputs["labels"]
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], dim=1)


def accepts_logits_to_keep(model) -> bool:
    """Whether the causal LM under any PEFT wrapper takes ``logits_to_keep``."""
    inner = model
    for attr in ("get_base_model",):
        if hasattr(inner, attr):
            inner = getattr(inner, attr)()
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def labelled_logits(model, inputs: dict, keep, keep_kwarg: bool | None = None):
    """(float logits of the positions in the boolean mask ``keep``, outputs), selected before ``lm_head`` when
    the model takes ``logits_to_keep``."""
    model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
    if keep_kwarg is None:
        keep_kwarg = accepts_logits_to_keep(model)
    if keep_kwarg:
        # use_cache=False: with a cache, transformers does not read packed position_ids as separate sequences
        outputs = model(**model_inputs, use_cache=False, logits_to_keep=keep)
        logits = outputs.logits
        if logits.dim() == 3:  # a model that sliced nothing
            logits = logits[keep]
    else:
        outputs = model(**model_inputs, use_cache=False)
        logits = outputs.logits[keep]
    return logits.float(), outputs


def token_mean(total, keep, num_items=None):
    """``total`` divided by ``num_items`` (the Trainer's label count over the accumulated step) or this batch's."""
    denominator = num_items if num_items is not None else keep.sum().clamp(min=1)
    if hasattr(denominator, "to"):
        denominator = denominator.to(total.device)
    return total / denominator


def selected_loss(model, inputs: dict, num_items=None, keep_kwarg: bool | None = None):
    """(loss, outputs): cross-entropy over the labelled next-token positions only."""
    import torch.nn.functional as F

    shift = shifted_labels(inputs)
    keep = shift != IGNORE
    logits, outputs = labelled_logits(model, inputs, keep, keep_kwarg)
    total = F.cross_entropy(logits, shift[keep], reduction="sum")
    return token_mean(total, keep, num_items), outputs
