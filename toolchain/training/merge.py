"""Merge a LoRA (or DoRA, or rsLoRA) adapter into a full-precision copy of the base model.

The merge happens in float32 whatever the recipe's final dtype (merging into a quantised or
half-precision base is the classic source of "gibberish after a QLoRA merge"); every merged
tensor is checked finite before anything is written. The merged model is then checked against the
unmerged PeftModel on a few token sequences (the eval split when the data stage's folder is given,
else a fixed small batch): max |Δlogit| relative to the logits' scale and the mean next-token KL go
into the manifest, and a merge outside its tier (``MERGE_TIERS``) stops the stage. A model whose
config ties the input embedding and the LM head must still have one tensor for both after the merge
and must reload tied from the saved directory. The output is a standard HF directory with the
tokenizer, chat template and generation config, readable by transformers 5 and 4.57.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from toolchain.core.errors import StageError
from toolchain.core.models import patch_config, save_tokenizer
from toolchain.training.tied import check_tied, refuse_tied_targets, ties_embeddings


@dataclass(frozen=True)
class MergeTier:
    rel_max: float  # max |merged - unmerged logit| / max |unmerged logit|, over the check sequences
    kl_max: float  # mean KL(unmerged || merged) of the next-token distributions, nats
    why: str


# One table: how far a float32 merged model may sit from the unmerged PeftModel, per adapter kind.
# Measured (helper script, issue 14 report) with random adapters far larger than a fine-tune's (rank 16 on every projection,
# init_lora_weights=False, B halved, DoRA magnitudes * (1 + 0.1 N(0,1)); they move SmolLM2-135M's logits
# by 0.65-1.1 of their scale, KL 0.4-9 nats from the base) on 4 fixed texts, 61 positions, 1 thread:
# SmolLM2 lora rel 8.0e-5 / KL 1.2e-9, dora 5.5e-6 / 2.8e-11, rslora 2.9e-5 / 3.9e-10 (rel: max |Δlogit| over
# the largest |logit|, ~40 there; 30 layers of float32 rounding of activations that large). The bounds
# leave >= 10x over those; a merge error (scale lost, doubled or alpha / r instead of alpha / sqrt(r), a
# module left unmerged, DoRA's norm taken over the wrong axis) moves the logits by a share of the
# adapter's own effect, rel 1e-2 and more, KL 1e-3 and more.
_FP32 = "both sides float32; merging only reassociates x @ W + s * (x @ A) @ B into x @ (W + s * B @ A)"
MERGE_TIERS = {
    "lora": MergeTier(1e-3, 1e-6, _FP32 + "; measured rel 8.0e-5, KL 1.2e-9 (SmolLM2, random rank-16 adapter)"),
    "dora": MergeTier(1e-3, 1e-6, _FP32 + ", DoRA's magnitude / row norm folded into W: measured rel 5.5e-6, "
                      "KL 2.8e-11 (SmolLM2, random rank-16 adapter, magnitudes perturbed 10%)"),
    "rslora": MergeTier(1e-3, 1e-6, _FP32 + " with s = alpha / sqrt(r): measured rel 2.9e-5, KL 3.9e-10 (SmolLM2, "
                        "random rank-16 adapter); an alpha / r scale instead is off by sqrt(r) = 4x of the delta"),
}
CHECK_ROWS = 8  # sequences the merge is checked on
CHECK_TEXTS = (  # the fixed batch when no data folder is given
    "Write 5 March 2021 as YYYY-MM-DD.",
    "The quick brown fox jumps over the lazy dog.",
    "ISO date for: 31 August 1958",
    "Once upon a time, in a small town by the sea, there lived an old clockmaker.",
)


def adapter_kind(adapter_dir: Path) -> str:
    """``dora``, ``rslora`` or ``lora``, from the adapter's adapter_config.json (DoRA first: it may also be rs)."""
    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    return "dora" if cfg.get("use_dora") else "rslora" if cfg.get("use_rslora") else "lora"


def check_sequences(tokenizer, data_dir: Path | None = None, max_length: int = 128) -> list[list[int]]:
    """Token ids the merge is checked on: the eval split (else train split) rows, else ``CHECK_TEXTS``."""
    from toolchain.core.chat import tokenize_example

    rows: list[dict] = []
    for name in ("eval.jsonl", "train.jsonl"):
        path = Path(data_dir) / name if data_dir is not None else None
        if path is not None and path.exists():
            with open(path) as f:
                rows = [json.loads(line) for line in f if line.strip()][:CHECK_ROWS]
        if rows:
            break
    seqs = []
    for row in rows:
        try:
            tok = tokenize_example(row, tokenizer, max_length, train_on_prompt=True)
        except ValueError:
            tok = None
        if tok and len(tok["input_ids"]) > 1:
            seqs.append(tok["input_ids"])
    if not seqs:
        seqs = [ids[:max_length] for ids in (tokenizer(t)["input_ids"] for t in CHECK_TEXTS) if len(ids) > 1]
    return seqs


def sequence_logits(model, seqs: list[list[int]]) -> list:
    import torch

    was_training = model.training
    model.eval()
    with torch.inference_mode():
        out = [model(input_ids=torch.tensor([ids])).logits[0].float() for ids in seqs]
    model.train(was_training)
    return out


def compare_logits(ref: list, got: list) -> dict:
    """max |Δlogit|, its ratio to max |ref logit|, and mean KL(ref || got) over every position."""
    import torch

    max_abs, scale, kl_sum, n = 0.0, 0.0, 0.0, 0
    for r, g in zip(ref, got):
        r64, g64 = r.double(), g.double()
        max_abs = max(max_abs, (g64 - r64).abs().max().item())
        scale = max(scale, r64.abs().max().item())
        lp, lq = torch.log_softmax(r64, -1), torch.log_softmax(g64, -1)
        kl_sum += (lp.exp() * (lp - lq)).sum(-1).clamp_min(0).sum().item()
        n += r.shape[0]
    return {"max_abs_logit_diff": max_abs, "max_abs_logit": scale,
            "rel_logit_diff": max_abs / scale if scale else float("inf"), "mean_kl": kl_sum / max(n, 1),
            "positions": n, "sequences": len(ref)}


def merge(base_dir: Path, adapter_dir: Path, out_dir: Path, dtype: str = "float32", data_dir: Path | None = None,
          max_length: int = 128, base_model=None) -> dict:
    """Merge ``adapter_dir`` into the base and write the merged model to ``out_dir``.

    ``base_model``: a float32 model to merge into instead of loading ``base_dir`` (e.g. a dequantised
    base); its config and tokenizer still come from ``base_dir``. Returns the manifest's figures."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = base_model if base_model is not None else AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    base = base.float()
    tied = ties_embeddings(base)
    kind = adapter_kind(adapter_dir)
    if tied:  # an adapter on the shared tensor would merge into both modules (or untie them)
        adapter_cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
        refuse_tied_targets(base, adapter_cfg.get("target_modules"),
                            where=f"merge: {Path(adapter_dir).name}/adapter_config.json target_modules")
    model = PeftModel.from_pretrained(base, adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir if (Path(adapter_dir) / "tokenizer.json").exists() else base_dir)
    seqs = check_sequences(tokenizer, data_dir, max_length)
    ref = sequence_logits(model, seqs)
    merged = model.merge_and_unload()
    bad = [name for name, t in merged.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise StageError(f"merged weights are not finite in {len(bad)} tensors ({', '.join(bad[:5])}); "
                         "nothing was written (fix: check the adapter's training loss, lower the learning rate)")
    check = compare_logits(ref, sequence_logits(merged, seqs))
    tier = MERGE_TIERS[kind]
    if not check["rel_logit_diff"] <= tier.rel_max or not check["mean_kl"] <= tier.kl_max:
        raise StageError(
            f"the merged {kind} model's logits diverge from the unmerged adapter's on {check['sequences']} sequences: "
            f"max |Δlogit| {check['max_abs_logit_diff']:.3g} ({check['rel_logit_diff']:.3g} of the logit scale, "
            f"tier {tier.rel_max:g}), mean KL {check['mean_kl']:.3g} (tier {tier.kl_max:g}); nothing was written "
            "(fix: report it, with the adapter; merge.dtype does not affect this float32 comparison)")
    if tied:
        merged.config.tie_word_embeddings = True  # peft unties the flag when the tensors diverged; check_tied says so
        if hasattr(merged.config, "get_text_config"):
            merged.config.get_text_config().tie_word_embeddings = True
        check_tied(merged, "merge")
    merged, cfg, reloaded = write_model(merged, tokenizer, base_dir, Path(out_dir), dtype, tied)
    leftovers = adapter_tensors(Path(out_dir))
    if leftovers:
        raise StageError(f"the merged checkpoint still holds adapter tensors {leftovers[:5]} (fix: report it)")
    if tied and not torch.equal(reloaded.get_input_embeddings().weight, merged.get_input_embeddings().weight):
        raise StageError(f"the saved merge in {out_dir} reloads another embedding than the merged one (fix: report it)")
    n_params = sum(t.numel() for t in merged.parameters())
    return {"dtype": dtype, "parameters": int(n_params), "architecture": (cfg.get("architectures") or ["?"])[0],
            "tensors_checked_finite": len(merged.state_dict()), "adapter_kind": kind,
            "merge_check": {**check, "tier": {"rel_max": tier.rel_max, "kl_max": tier.kl_max}},
            "tied_embeddings": tied}


def write_model(model, tokenizer, base_dir: Path, out_dir: Path, dtype: str, tied: bool):
    """The merged model cast to ``dtype`` and written as a standard HF directory (weights, tokenizer, the base's
    generation config, the patched config); a tied model is reloaded and checked still tied. Returns the cast
    model, the written config and the reloaded model (None when not tied)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    model.save_pretrained(out_dir, safe_serialization=True)
    save_tokenizer(tokenizer, out_dir)
    try:
        GenerationConfig.from_pretrained(base_dir).save_pretrained(out_dir)
    except OSError:
        pass
    cfg = patch_config(out_dir)
    reloaded = None
    if tied:
        reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=getattr(torch, dtype))
        if not ties_embeddings(reloaded):
            raise StageError(f"{out_dir}/config.json lost tie_word_embeddings: true in the merge (fix: report it)")
        check_tied(reloaded, f"the saved model in {out_dir}")
    return model, cfg, reloaded


def adapter_tensors(model_dir: Path) -> list[str]:
    """Names in the saved safetensors that belong to an adapter (LoRA A/B, DoRA magnitudes)."""
    from safetensors import safe_open

    names = []
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            names += [k for k in st.keys() if "lora_" in k or "magnitude" in k]
    return names
