"""Stage ``report``: report.json, report.md and report.html (with plots) from every stage before it."""
from __future__ import annotations

from pathlib import Path

from toolchain.pipeline.plan import Context, PlanState, Stage
from toolchain.pipeline.recipe import Recipe


def plan(recipe: Recipe, state: PlanState) -> list[Stage]:
    ids = state.ids()
    return [Stage("report", "report", ids, {"title": recipe.report.title}, run, "write report.json / .md / .html")]


def run(ctx: Context, inputs: dict, out: Path) -> dict:
    from toolchain.report import collect, write_report

    write_report(collect(ctx, inputs), out)
    return {"files": sorted(p.name for p in out.iterdir())}
