"""Stage ``merge``: the adapter merged into a full-precision model, the model every later stage uses.

How an adapter is merged is its training method's (``TrainingMethod.merge``).
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from toolchain.pipeline.plan import BASE, Context, PlanState, Stage
from toolchain.pipeline.recipe import Recipe


def plan(recipe: Recipe, state: PlanState) -> list[Stage]:
    if not state.has("train"):
        return []
    return [Stage("merge", "merge", [BASE, "train", "data"], asdict(recipe.merge), run, "merge the adapter",
                  roles={"base": BASE, "train": "train", "data": "data"})]


def run(ctx: Context, inputs: dict, out: Path) -> dict:
    from toolchain.training.method import method_for

    method = method_for(ctx.recipe.train.method)
    return method.merge(inputs["base"].path, inputs["train"].path, out, ctx.recipe, inputs["data"].path)
