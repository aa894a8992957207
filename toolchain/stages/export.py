"""Stage ``export`` (one per recipe target) and, after each, its ``bench`` stages (one per runtime).

An exporter is reached only through the exporter table (``toolchain.pipeline.registry.EXPORTERS``):
its entry names the entry point, the options class and the extra inputs it takes (``needs``):
``calibration``, ``imatrix``, ``reference``, ``adapter``.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from toolchain.pipeline.plan import BASE, Context, PlanState, Stage
from toolchain.pipeline.recipe import Recipe
from toolchain.stages.bench import bench_stage


def plan(recipe: Recipe, state: PlanState) -> list[Stage]:
    from toolchain.pipeline.registry import EXPORTERS, target_config

    stages = []
    for t in recipe.targets:
        entry = EXPORTERS.get(t.format)
        cfg = target_config(t)
        roles = {"model": state.model}
        if getattr(cfg, "needs_calibration", False):
            roles["calibrate"] = "calibrate"
        if getattr(cfg, "needs_imatrix", False):
            roles["imatrix"] = "imatrix"
        if getattr(cfg, "needs_adapter", False):
            roles.update(base=BASE, train="train")
        if "reference" in entry.needs:  # checks its files on the reference's quality ids
            roles["reference"] = "reference"
        eid = f"export-{t.name}"
        config = {"format": t.format, "options": t.options}
        stages.append(Stage(eid, "export", list(dict.fromkeys(roles.values())), config, make_export(t),
                            f"export {t.format} {t.options or ''}".strip(), target=t.name, roles=roles,
                            versions=entry.versions))
        for rt in t.bench_runtimes:
            stages.append(bench_stage(recipe, rt, t.name, eid))
    return stages


def export_extras(entry, inputs: dict) -> dict:
    """Extra inputs an exporter declares in the registry (``needs``), as keyword arguments."""
    extras = {}
    if "calibration" in entry.needs and "calibrate" in inputs:
        extras["calibration"] = inputs["calibrate"].path / "calibration.json"
    if "imatrix" in entry.needs and "imatrix" in inputs:
        extras["imatrix"] = inputs["imatrix"].path / "imatrix.gguf"
    if "reference" in entry.needs and "reference" in inputs:
        extras["reference"] = inputs["reference"].path
    if "adapter" in entry.needs:
        extras["adapter_dir"] = inputs["train"].path
        extras["base_dir"] = inputs["base"].path
    return extras


def make_export(target) -> Callable:
    def run_export(ctx: Context, inputs: dict, out: Path) -> dict:
        from toolchain.pipeline.registry import EXPORTERS, target_config

        entry = EXPORTERS.get(target.format)
        check = entry.preflight()
        if check is not None:
            check(inputs["model"].path, target.options)
        t = time.perf_counter()
        info = entry.load()(inputs["model"].path, out, target.options, **export_extras(entry, inputs))
        info = dict(info or {})
        info.update(target=target.name, format=target.format, export_s=time.perf_counter() - t,
                    gate_key=gate_key(target_config(target), info))
        return info
    return run_export


def gate_key(cfg, info: dict) -> str | None:
    """What the export is judged as: the options' ``gate_key`` (e.g. ``int8-integer``), else its precision."""
    key = getattr(cfg, "gate_key", None)
    return str(key) if key is not None else (str(info["precision"]) if info.get("precision") is not None else None)
