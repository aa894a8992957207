"""The QLoRA merge: two full-precision candidates, measured against the model as trained, one written.

A QLoRA adapter was trained on top of dequant(quant(W)), the 4-bit base, not the original W. Merging
into the 4-bit base would re-quantise W + ΔW (peft #2321), so it is never done; instead both float32
candidates are built and measured (docs/architecture.md, facts):

- ``dequantized``: dequant(quant(W)), taken from the very Linear4bit weights the adapter was trained
  against (bitsandbytes quantisation is deterministic: re-quantising W with the same settings gives the
  same codes), plus the adapter, merged by peft in float32 (DoRA's magnitude too, on that base). It is
  the trained function, only re-associated: it should match the as-trained model to float32 rounding.
- ``original``: the original float32 W plus the same adapter. It differs from what was trained by the
  4-bit rounding error of every quantised matrix.

Each is compared with the as-trained model (the 4-bit base plus the unmerged adapter, float32 compute)
on the eval split, tokenised as training does: mean KL(as-trained || candidate), next-token top-1
agreement and eval loss. ``merge.qlora_into`` picks the one written (default dequantized); it must pass
its gate tier (``QLORA_MERGE``, or ``QLORA_MERGE_ORIGINAL`` for the original weights) or the stage fails.
The chosen one is written by ``toolchain.training.merge.merge`` (finite check, its own merged-vs-unmerged
check, tied embeddings, tokenizer, generation config, config patch) into the stage's ``.partial`` folder.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from toolchain.core.errors import StageError

MEASURE_ROWS = 32  # eval rows the candidates are measured on
CANDIDATES = ("dequantized", "original")
TIER_OF = {"dequantized": "QLORA_MERGE", "original": "QLORA_MERGE_ORIGINAL"}


def measure_rows(tokenizer, data_dir: Path | None, dcfg) -> list[dict]:
    """Eval rows (train rows when the eval split is empty) tokenised as training does, at most MEASURE_ROWS."""
    from toolchain.core.chat import tokenize_example
    from toolchain.training.merge import check_sequences

    max_length = getattr(dcfg, "max_length", 128)
    out: list[dict] = []
    for name in ("eval.jsonl", "train.jsonl"):
        path = Path(data_dir) / name if data_dir is not None else None
        if path is None or not path.exists():
            continue
        with open(path) as f:
            for line in f:
                if len(out) >= MEASURE_ROWS:
                    break
                if line.strip():
                    tok = tokenize_example(json.loads(line), tokenizer, max_length, getattr(dcfg, "train_on_prompt", False))
                    if tok and len(tok["input_ids"]) > 1:
                        out.append(tok)
        if out:
            return out
    return [{"input_ids": ids, "labels": list(ids)} for ids in check_sequences(tokenizer, None, max_length)]


def dequantized_weights(model4) -> dict:
    """{module name: float32 dequant(quant(W))} of every Linear4bit of the 4-bit model, on the CPU."""
    import bitsandbytes.functional as bnbf
    import torch

    out = {}
    for name, m in model4.named_modules():
        if type(m).__name__ == "Linear4bit":
            w = m.weight
            out[name] = bnbf.dequantize_4bit(w.data, w.quant_state).to(torch.float32).cpu()
    return out


def exact_cpu_path(model4) -> int:
    """Keep every 4-bit linear on the path training took. On a CPU with AVX512-BF16, bitsandbytes 0.50 runs an
    eval-mode, no-grad forward through a fused kernel that repacks the weights and computes in bfloat16; training
    (train mode, grad) dequantises and multiplies in the compute dtype. Measured on the QLoRA quickstart: the fused
    path moved the as-trained logits by up to 0.44 (KL 8e-4 against the exact merge), the training path by none.
    Returns the number of linears switched."""
    n = 0
    for m in model4.modules():
        if getattr(m, "support_avx512bf16_for_cpu", False):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def fp32_base(base_dir: Path, weights: dict | None = None):
    """The float32 base; with ``weights``, those modules' weights replaced (the dequantised base)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, w in (weights or {}).items():
            target = model.get_submodule(name).weight
            if tuple(target.shape) != tuple(w.shape):
                raise StageError(f"{name}: the dequantised weight is {tuple(w.shape)}, the base's {tuple(target.shape)} "
                                 "(fix: report it)")
            target.copy_(w)
    return model.eval()


def compare(trained, candidates: dict, rows: list[dict]) -> dict:
    """Per candidate: mean KL(as-trained || candidate) and top-1 agreement over every position, eval loss over
    the labelled ones; plus the as-trained model's eval loss."""
    import torch

    device = next(trained.parameters()).device
    acc = {name: {"kl": 0.0, "top1": 0, "nll": 0.0} for name in candidates}
    trained_nll, positions, labelled = 0.0, 0, 0
    with torch.inference_mode():
        for row in rows:
            ids = torch.tensor([row["input_ids"]], device=device)
            labels = torch.tensor(row["labels"][1:], device=device)
            mask = labels != -100
            ref = torch.log_softmax(trained(input_ids=ids).logits[0].double(), -1)
            nxt = ids[0, 1:]
            trained_nll += -ref[:-1][mask].gather(-1, nxt[mask][:, None]).sum().item()
            positions += ref.shape[0]
            labelled += int(mask.sum())
            for name, model in candidates.items():
                lp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
                a = acc[name]
                a["kl"] += (ref.exp() * (ref - lp)).sum(-1).clamp_min(0).sum().item()
                a["top1"] += int((ref.argmax(-1) == lp.argmax(-1)).sum())
                a["nll"] += -lp[:-1][mask].gather(-1, nxt[mask][:, None]).sum().item()
    n, m = max(positions, 1), max(labelled, 1)
    out = {name: {"kl_mean": a["kl"] / n, "top1_agreement": a["top1"] / n, "eval_loss": a["nll"] / m}
           for name, a in acc.items()}
    return {"candidates": out, "trained_eval_loss": trained_nll / m, "rows": len(rows), "positions": positions,
            "labelled_positions": labelled}


def quant_error(original, weights: dict) -> float:
    """sum |W - dequant(quant(W))| / sum |W| over the quantised matrices."""
    num = den = 0.0
    for name, w in weights.items():
        w0 = original.get_submodule(name).weight.detach()
        num += (w0 - w).abs().sum().item()
        den += w0.abs().sum().item()
    return num / den if den else float("nan")


def judge(name: str, figures: dict, trained_loss: float) -> dict:
    """The candidate's verdict under its gate tier (greedy outputs are not measured here)."""
    from toolchain.quality.gates import TIERS

    quality = {"ppl": math.exp(figures["eval_loss"]), "ref_ppl": math.exp(trained_loss), "kl_mean": figures["kl_mean"],
               "top1_agreement": figures["top1_agreement"], "greedy_prefix": float("nan")}
    verdict = TIERS[TIER_OF[name]].check(quality)
    verdict["gate"] = TIER_OF[name]
    return verdict


def merge_qlora(base_dir: Path, adapter_dir: Path, out_dir: Path, recipe, data_dir: Path | None, quant: dict,
                load_4bit) -> dict:
    """Build, measure and judge both candidates; write the one ``recipe.merge.qlora_into`` names.

    ``load_4bit(base_dir, quant, compute_dtype)``: the 4-bit base as trained (``toolchain.training.qlora``)."""
    import gc

    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from toolchain.training.merge import merge

    chosen = recipe.merge.qlora_into
    tok_dir = adapter_dir if (Path(adapter_dir) / "tokenizer.json").exists() else base_dir
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    rows = measure_rows(tokenizer, data_dir, recipe.data)

    model4 = load_4bit(base_dir, quant, compute_dtype="float32")  # as trained, measured in float32 compute
    weights = dequantized_weights(model4)
    trained = PeftModel.from_pretrained(model4, adapter_dir).eval()
    device = next(trained.parameters()).device
    original = fp32_base(base_dir)
    error = quant_error(original, weights)
    candidates = {
        "dequantized": PeftModel.from_pretrained(fp32_base(base_dir, weights), adapter_dir).merge_and_unload(),
        "original": PeftModel.from_pretrained(original, adapter_dir).merge_and_unload(),
    }
    candidates = {k: m.to(device).eval() for k, m in candidates.items()}
    measured = compare(trained, candidates, rows)
    del trained, model4, candidates, original
    gc.collect()

    verdicts = {name: judge(name, measured["candidates"][name], measured["trained_eval_loss"]) for name in CANDIDATES}
    figs = measured["candidates"]
    other = "original" if chosen == "dequantized" else "dequantized"
    why = (f"the adapter was trained against the 4-bit weights dequant(quant(W)) ({quant['quant_type']}, double quant "
           f"{quant['double_quant']}); `original` adds its delta to W instead, so it carries the 4-bit rounding error "
           f"of {len(weights)} matrices (mean |W - dequant(quant(W))| / mean |W| = {error:.3g}): KL "
           f"{figs['original']['kl_mean']:.3g} against {figs['dequantized']['kl_mean']:.3g} for `dequantized`")
    summary = {
        "chosen": chosen, "reason": f"merge.qlora_into: {chosen}" + (" (the default)" if chosen == "dequantized" else ""),
        "other_differs_because": why, "quant": {k: quant.get(k) for k in ("quant_type", "double_quant", "compute_dtype")},
        "measured_in": "float32 compute", "weight_quant_error": error,
        "trained_eval_loss": measured["trained_eval_loss"], "rows": measured["rows"],
        "positions": measured["positions"], "labelled_positions": measured["labelled_positions"],
        "candidates": {name: {**figs[name], "gate": verdicts[name]} for name in CANDIDATES},
    }
    verdict = verdicts[chosen]
    if not verdict["passed"]:
        raise StageError(
            f"merge.qlora_into: {chosen}: the merged model departs from the model as trained (4-bit base + adapter) "
            f"beyond gate {verdict['gate']}: {'; '.join(verdict['failures'])} on {measured['rows']} eval rows; "
            f"nothing was written ({other}: KL {figs[other]['kl_mean']:.3g}, top-1 {figs[other]['top1_agreement']:.3f}; "
            "fix: " + ("report it, with the adapter" if chosen == "dequantized" else
                       "set merge.qlora_into: dequantized, which merges into the weights the adapter was trained against")
            + ")")

    base = fp32_base(base_dir, weights if chosen == "dequantized" else None)
    written = merge(base_dir, adapter_dir, out_dir, recipe.merge.dtype, data_dir=data_dir,
                    max_length=getattr(recipe.data, "max_length", 128), base_model=base)
    del base
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {**written, "qlora_merge": summary}
