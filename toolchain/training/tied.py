"""Tied input embedding and LM head (SmolLM2 ties ``embed_tokens`` and ``lm_head``: one tensor, 21% of it).

An adapter on either one cannot stay faithful through a merge: peft merges the delta into the shared
tensor in place, so the other module changes too (and the merged model no longer computes what the
trained adapter did), while a copy-on-merge would give two different tensors that a checkpoint saved
with ``tie_word_embeddings: true`` keeps only one of. So such targets are refused before training and
again at the merge, and every merge of a tied model is checked to stay tied.
"""
from __future__ import annotations

from toolchain.core.errors import StageError

FIX = "train.lora.target_modules"


def ties_embeddings(model) -> bool:
    """Whether the model's config ties the LM head to the input embedding."""
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return bool(getattr(text, "tie_word_embeddings", False) or getattr(cfg, "tie_word_embeddings", False))


def tied_module_names(model) -> list[str]:
    """Full module names of the input embedding and the LM head when the model ties them (else [])."""
    if not ties_embeddings(model):
        return []
    wanted = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    return [name for name, module in model.named_modules() if any(module is w for w in wanted)]


def tied_targets(model, target_modules) -> list[str]:
    """The entries of ``target_modules`` that name a tied module (peft's list rule: the whole module
    name, or its last dotted parts). peft's ``all-linear`` leaves the output layer out, and an embedding
    is no linear, so it names none; a regex string (an adapter_config's own) is matched with re.fullmatch."""
    import re

    tied = tied_module_names(model)
    if not tied or target_modules is None:
        return []
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return []
        return [target_modules] if any(re.fullmatch(target_modules, name) for name in tied) else []
    if list(target_modules) == ["all-linear"]:
        return []
    return sorted({t for t in target_modules for name in tied if name == t or name.endswith("." + t)})


def refuse_tied_targets(model, target_modules, where: str = FIX) -> None:
    """StageError when ``target_modules`` adapts the tied input embedding or LM head."""
    hits = tied_targets(model, target_modules)
    if hits:
        value = target_modules if isinstance(target_modules, str) else sorted(target_modules)
        raise StageError(
            f"{where}: {hits} adapts the input embedding / LM head, which this model ties (config "
            f"tie_word_embeddings: true; modules {tied_module_names(model)}): a merge would change both through "
            "the shared tensor, or untie them, and a checkpoint saved as tied keeps only one. "
            f"Got {value!r}; fix: remove {', '.join(hits)} from train.lora.target_modules "
            "(or use [all-linear], which leaves the LM head out)")


def check_tied(model, where: str) -> None:
    """StageError unless the LM head and the input embedding are one tensor (or equal ones)."""
    import torch

    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if emb is None or head is None:
        return
    if head.weight.data_ptr() != emb.weight.data_ptr() and not torch.equal(head.weight, emb.weight):
        diff = (head.weight.float() - emb.weight.float()).abs().max().item()
        raise StageError(f"{where}: the config ties the LM head to the input embedding (tie_word_embeddings: true), "
                         f"but lm_head and embed_tokens differ (max |diff| {diff:.3g}); a tied checkpoint would keep "
                         f"only one of them (fix: train without adapting lm_head or embed_tokens, {FIX})")
