"""Stage ``eval``: the task metric before and after fine-tuning.

Greedy generation for the eval split's prompts, scored against the references (exact match after
trimming whitespace, or containment), on the base model and on the model later stages use.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from toolchain.core.chat import prompt_and_reference, render_prompt
from toolchain.core.files import write_json_atomic
from toolchain.pipeline.plan import BASE, Context, PlanState, Stage
from toolchain.pipeline.recipe import EvalSection, Recipe
from toolchain.stages.data import read_jsonl


def plan(recipe: Recipe, state: PlanState) -> list[Stage]:
    if not state.has("data"):
        return []
    return [Stage("eval", "eval", [BASE, state.model, "data"], asdict(recipe.eval), run,
                  f"{recipe.eval.metric} before/after fine-tuning",
                  roles={"base": BASE, "model": state.model, "data": "data"})]


def run(ctx: Context, inputs: dict, out: Path) -> dict:
    examples = read_jsonl(inputs["data"].path / "eval.jsonl")
    ecfg = ctx.recipe.eval
    after = task_metric(inputs["model"].path, examples, ecfg, ctx.progress)
    before = task_metric(inputs["base"].path, examples, ecfg, ctx.progress) if ecfg.before else None
    write_json_atomic(out / "outputs.json", {"before": before, "after": after}, indent=1)
    samples = []
    for i, a in enumerate(after["outputs"][:8]):
        samples.append({"prompt": a["prompt"], "reference": a["reference"], "after": a["output"],
                        "before": before["outputs"][i]["output"] if before else None})
    return {"metric": ecfg.metric, "examples": after["examples"], "after": after["score"],
            "before": before["score"] if before else None, "samples": samples}


def score(prediction: str, reference: str, metric: str) -> float:
    p, r = prediction.strip(), reference.strip()
    if metric == "exact_match":
        return float(p == r)
    if metric == "contains":
        return float(r in p)
    raise ValueError(f"unknown metric {metric!r}")


def task_metric(model_dir: Path, examples: list[dict], ecfg: EvalSection, progress: bool = True) -> dict:
    """Greedy-generate for each eval prompt and score it. Returns score and per-example outputs."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pairs = [prompt_and_reference(ex) for ex in examples if "messages" in ex][: ecfg.max_examples]
    outputs: list[str] = []
    batches = range(0, len(pairs), ecfg.batch_size)
    for start in tqdm(batches, desc=f"eval {Path(model_dir).name[:24]}", disable=not progress, leave=False):
        chunk = pairs[start:start + ecfg.batch_size]
        texts = [render_prompt(msgs, tok) for msgs, _ in chunk]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=ecfg.max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        for row in out[:, enc["input_ids"].shape[1]:]:
            outputs.append(tok.decode(row, skip_special_tokens=True))
    scores = [score(o, ref, ecfg.metric) for o, (_, ref) in zip(outputs, pairs)]
    return {
        "metric": ecfg.metric, "examples": len(pairs),
        "score": float(np.mean(scores)) if scores else float("nan"),
        "outputs": [{"prompt": msgs[-1]["content"], "reference": ref, "output": o, "correct": bool(s)}
                    for (msgs, ref), o, s in zip(pairs, outputs, scores)],
    }
