"""Stage ``train``: the recipe's training method (``train.method``) fine-tunes an adapter on the data.

The method comes from the method table (``toolchain.pipeline.registry.METHODS``); the Trainer harness
(``toolchain.training.trainer``) is the same for every method.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from toolchain.pipeline.plan import BASE, Context, PlanState, Stage
from toolchain.pipeline.recipe import Recipe
from toolchain.stages.data import read_jsonl


def plan(recipe: Recipe, state: PlanState) -> list[Stage]:
    if not state.has("data"):
        return []
    return [Stage("train", "train", [BASE, "data"], {"train": asdict(recipe.train), "data": asdict(recipe.data)},
                  run, f"{recipe.train.method} fine-tune", roles={"base": BASE, "data": "data"})]


def run(ctx: Context, inputs: dict, out: Path) -> dict:
    from toolchain.training.method import method_for
    from toolchain.training.trainer import train

    d = inputs["data"].path
    return train(inputs["base"].path, read_jsonl(d / "train.jsonl"), read_jsonl(d / "eval.jsonl"), ctx.recipe.train,
                 ctx.recipe.data, out, method_for(ctx.recipe.train.method), resume=ctx.resume, progress=ctx.progress)
