"""``train.method: hft``: half fine-tuning (Hui et al. 2024, "HFT: Half Fine-Tuning for Large Language
Models", arXiv 2404.18466, ACL 2025).

Full-parameter training of half of the model's parameter matrices while the other half stays frozen
at the base's values, the trained half redrawn ``train.hft.rounds`` times over the run. No adapter:
the training result is the full model, and the merge takes it as the merged model.

The selection rule is the paper's, category by category in every decoder layer:

- self-attention: 2 of the 4 projections (q, k, v, o) train, drawn at random per layer;
- feed-forward: 2 of the 3 projections (gate, up, down) train in a random half of the layers and 1 of 3
  in the other half (so half of the FFN matrices overall);
- the layer's norms (input, post-attention): 1 of the 2 trains, per layer. The sources found give only
  the attention and FFN rule; the norms follow the same category-level halving;
- outside the layers (the token embedding, which SmolLM2 ties to the LM head, and the final norm):
  frozen. They are not repeated per layer, so the category rule cannot halve them; the tied embedding
  is 21% of SmolLM2's parameters, and keeping it frozen keeps the LM head and the embedding one tensor.

For ``fraction`` f other than 0.5 each category trains round(f x its matrices over all layers),
spread over the layers as evenly as possible (layers drawn at random for the remainder).

"Half" counts matrices, as the paper does. With grouped KV heads the matrices differ in size
(SmolLM2: k_proj and v_proj are a third of q_proj), so a round's share of parameters varies with the
draw; every matrix is drawn with probability f, so the expected share of the layers' parameters is
exactly f. docs/training.md gives SmolLM2's figures; the train manifest records each round's share.

Rounds: the trained half is redrawn every ceil(total_steps / rounds) optimiser steps (the paper
redraws per training stage / epoch). The optimiser holds every parameter
(``TrainingMethod.optimizer_holds_frozen``); a frozen parameter has no gradient, so AdamW neither
updates nor decays it, and its optimiser state is dropped when it is frozen: a matrix that comes
back in a later round starts with fresh moments, as a new stage of the paper starts a new optimiser.
"""
from __future__ import annotations

import math
import random
import re
from collections import defaultdict
from pathlib import Path

from toolchain.pipeline.recipe import HftSection
from toolchain.training.method import TrainingMethod

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")
ATTENTION, FFN, NORM, OTHER = "attention", "ffn", "norm", "other"


def category(unit: str) -> str:
    """The category of a unit (a module path inside one decoder layer, e.g. ``self_attn.q_proj``)."""
    head = unit.split(".")[0]
    if head in ("self_attn", "attn", "attention"):
        return ATTENTION
    if head in ("mlp", "feed_forward", "ffn"):
        return FFN
    if "norm" in head:
        return NORM
    return OTHER


def layer_units(model) -> dict[int, dict[str, list[str]]]:
    """layer index -> category -> that layer's units (full module paths), from the parameter names."""
    out: dict[int, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for name, _ in model.named_parameters():
        m = _LAYER.search(name)
        if not m:
            continue
        rest = m.group(2)
        unit = rest.rsplit(".", 1)[0] if "." in rest else rest
        full = name[: len(name) - len(rest)] + unit
        units = out[int(m.group(1))][category(unit)]
        if full not in units:
            units.append(full)
    return out


def draw(model, fraction: float, seed: int, round_index: int) -> set[str]:
    """The units (module paths) trained in round ``round_index``: the paper's rule, seeded."""
    rng = random.Random(f"hft:{seed}:{round_index}")
    layers = layer_units(model)
    chosen: set[str] = set()
    cats = sorted({c for per in layers.values() for c in per})
    for cat in cats:
        idx = sorted(i for i in layers if layers[i].get(cat))
        total = sum(len(layers[i][cat]) for i in idx)
        want = min(total, round(fraction * total))
        base, extra = divmod(want, len(idx)) if idx else (0, 0)
        extra_layers = set(rng.sample(idx, extra))
        leftover = 0
        for i in idx:
            units = sorted(layers[i][cat])
            quota = base + (1 if i in extra_layers else 0) + leftover
            take = min(quota, len(units))
            leftover = quota - take  # only when a layer has fewer units than its quota
            chosen.update(rng.sample(units, take))
    return chosen


def apply(model, units: set[str], optimizer=None) -> dict:
    """Train exactly the parameters of ``units``; freeze the rest (gradient and optimiser state dropped)."""
    trainable = total = 0
    for name, p in model.named_parameters():
        train = any(name.startswith(u + ".") for u in units)
        if p.requires_grad != train:
            p.grad = None
            if optimizer is not None:
                optimizer.state.pop(p, None)  # frozen: no state kept; back later: fresh moments
        p.requires_grad_(train)
        total += p.numel()
        trainable += p.numel() if train else 0
    return {"trainable_parameters": trainable, "total_parameters": total,
            "share": trainable / total if total else 0.0, "matrices": len(units)}


def layer_share(model, units: set[str]) -> float:
    """The share of the decoder layers' parameters that ``units`` hold."""
    inside = chosen = 0
    for name, p in model.named_parameters():
        if _LAYER.search(name):
            inside += p.numel()
            chosen += p.numel() if any(name.startswith(u + ".") for u in units) else 0
    return chosen / inside if inside else 0.0


def hft_settings(tcfg) -> HftSection:
    return tcfg.hft if tcfg.hft is not None else HftSection()


def make_callback(model, hcfg: HftSection):
    from transformers import TrainerCallback

    class HftRounds(TrainerCallback):
        """Redraws the trained half at each round boundary; records every round on ``model.hft_rounds``."""

        def __init__(self):
            self.length = None
            self.current = None

        def round_at(self, step: int) -> int:
            return min(step // self.length, hcfg.rounds - 1)

        def switch(self, r: int, step: int, model, optimizer) -> None:
            units = draw(model, hcfg.fraction, hcfg.seed, r)
            figures = apply(model, units, optimizer)
            self.current = r
            model.hft_rounds.append({"round": r, "from_step": step, **figures,
                                     "layer_share": layer_share(model, units), "units": sorted(units)})

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            self.length = max(1, math.ceil(state.max_steps / hcfg.rounds))
            self.switch(self.round_at(state.global_step), state.global_step, model, optimizer)

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            if state.global_step < state.max_steps and self.round_at(state.global_step) != self.current:
                self.switch(self.round_at(state.global_step), state.global_step, model, optimizer)

    model.hft_rounds = []
    return HftRounds()


class HalfFineTuning(TrainingMethod):
    name = "hft"
    summary = "half fine-tuning: full-parameter training of half the matrices, redrawn each round (arXiv 2404.18466)"
    optimizer_holds_frozen = True

    def wrap(self, model, tcfg):
        hcfg = hft_settings(tcfg)
        apply(model, draw(model, hcfg.fraction, hcfg.seed, 0))  # round 0, so the harness counts its share
        return model

    def callbacks(self, model, tcfg) -> list:
        return [make_callback(model, hft_settings(tcfg))]

    def save(self, model, out_dir: Path) -> None:
        """The full trained model (safetensors) and the rounds' draws; the harness adds the tokenizer."""
        model.save_pretrained(out_dir, safe_serialization=True)
        from toolchain.core.files import write_json_atomic

        write_json_atomic(Path(out_dir) / "hft_rounds.json", getattr(model, "hft_rounds", []), indent=1)

    def figures(self, tcfg) -> dict:
        hcfg = hft_settings(tcfg)
        return {"method": self.name, "fraction": hcfg.fraction, "rounds": hcfg.rounds, "hft_seed": hcfg.seed}

    def merge(self, base_dir: Path, adapter_dir: Path, out_dir: Path, recipe, data_dir: Path | None = None) -> dict:
        """The trained full model is the merged model: checked finite and tied, cast to merge.dtype, written
        with the tokenizer, the base's generation config and the patched config."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from toolchain.core.errors import StageError
        from toolchain.training.merge import check_tied, ties_embeddings, write_model

        dtype = recipe.merge.dtype
        model = AutoModelForCausalLM.from_pretrained(adapter_dir, dtype=torch.float32)
        bad = [n for n, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise StageError(f"the half fine-tuned weights are not finite in {len(bad)} tensors ({', '.join(bad[:5])}); "
                             "nothing was written (fix: check the training loss, lower train.learning_rate)")
        tied = ties_embeddings(model)
        if tied:
            check_tied(model, "merge (hft)")
        changed = changed_share(base_dir, model)
        model, cfg, _ = write_model(model, AutoTokenizer.from_pretrained(adapter_dir), base_dir, Path(out_dir), dtype, tied)
        return {"dtype": dtype, "parameters": int(sum(t.numel() for t in model.parameters())),
                "architecture": (cfg.get("architectures") or ["?"])[0], "tensors_checked_finite": len(model.state_dict()),
                "adapter_kind": "none (hft: the trained full model)", "tied_embeddings": tied, **changed}


def changed_share(base_dir: Path, model) -> dict:
    """How many of the model's parameters differ from the base's (what the rounds trained, in all)."""
    import torch
    from safetensors import safe_open

    base = {}
    for f in sorted(Path(base_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            base.update({k: st.get_tensor(k) for k in st.keys()})
    changed = total = 0
    for name, p in model.named_parameters():
        total += p.numel()
        ref = base.get(name)
        if ref is not None and ref.shape == p.shape and not torch.equal(ref.to(p.dtype), p.detach()):
            changed += p.numel()
    return {"changed_parameters": int(changed), "changed_share": changed / total if total else 0.0}


METHOD = HalfFineTuning()
