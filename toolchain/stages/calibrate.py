"""Stage ``calibrate``: the token sample every quantiser that calibrates shares (imatrix, static int8).

Planned only when a target (or a stage of the recipe) needs calibration or an importance matrix.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from toolchain.core import prompts
from toolchain.core.files import write_json_atomic
from toolchain.pipeline.plan import BASE, Context, PlanState, Stage
from toolchain.pipeline.recipe import Recipe
from toolchain.stages.data import read_jsonl


def plan(recipe: Recipe, state: PlanState) -> list[Stage]:
    if not (state.needs("calibration") or state.needs("imatrix")):
        return []
    return [Stage("calibrate", "calibrate", [BASE, *state.optional("data")], asdict(recipe.calibrate), run,
                  "calibration sample for quantisers", roles={"base": BASE, **{i: i for i in state.optional("data")}})]


def run(ctx: Context, inputs: dict, out: Path) -> dict:
    rows = read_jsonl(inputs["data"].path / "train.jsonl") if "data" in inputs else []
    return calibration_sample(inputs["base"].path, rows, ctx.recipe.calibrate, out)


def calibration_sample(model_dir: Path, rows: list[dict], ccfg, out: Path) -> dict:
    """Token sequences every quantiser that calibrates shares (imatrix, static int8).

    Training rows rendered with the chat template (what the model will see in use), topped up with
    the built-in prose so even a tiny dataset gives enough tokens; the held-out quality text is
    never used here, so calibration cannot leak into the quality figures.
    """
    import random

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(ccfg.seed)
    rows = list(rows)
    rng.shuffle(rows)
    texts = []
    for ex in rows:
        if "messages" in ex:
            texts.append(tok.apply_chat_template(ex["messages"], tokenize=False) if tok.chat_template
                         else "\n".join(m["content"] for m in ex["messages"]))
        elif "text" in ex:
            texts.append(ex["text"])
    texts += prompts.CALIBRATION_TEXTS
    stream: list[int] = []
    for t in texts:
        stream += tok(t, add_special_tokens=False)["input_ids"]
        if len(stream) >= ccfg.samples * ccfg.max_tokens:
            break
    batches = [stream[i:i + ccfg.max_tokens] for i in range(0, len(stream), ccfg.max_tokens)][: ccfg.samples]
    batches = [b for b in batches if len(b) >= 8]
    write_json_atomic(out / "calibration.json", {"batches": batches}, indent=None)
    return {"sequences": len(batches), "tokens": sum(len(b) for b in batches), "max_tokens": ccfg.max_tokens}
