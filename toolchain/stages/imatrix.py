"""Stage ``imatrix``: the importance matrix (llama.cpp's imatrix format) on the calibration sample.

A calibration statistic of the model later stages use, shared by every quantiser that weights its
rounding by it (llama.cpp's k-quants and IQ types, edgesmith's int8/int4 scale search).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from toolchain.pipeline.plan import Context, PlanState, Stage
from toolchain.pipeline.recipe import Recipe

METHOD = "llama-imatrix sum of x^2"


def plan(recipe: Recipe, state: PlanState) -> list[Stage]:
    if not state.needs("imatrix"):
        return []
    return [Stage("imatrix", "imatrix", [state.model, "calibrate"], {"method": METHOD}, run,
                  "importance matrix on the calibration sample", roles={"model": state.model, "calibrate": "calibrate"})]


def run(ctx: Context, inputs: dict, out: Path) -> dict:
    from toolchain.core.imatrix import compute_imatrix, save_imatrix

    batches = json.loads((inputs["calibrate"].path / "calibration.json").read_text())["batches"]
    model_dir = inputs["model"].path
    model_type = json.loads((model_dir / "config.json").read_text()).get("model_type", "llama")
    t = time.perf_counter()
    data = compute_imatrix(model_dir, batches, family=model_type)
    save_imatrix(data, out / "imatrix.gguf")
    return {"entries": len(data), "tokens": sum(len(b) for b in batches), "compute_s": time.perf_counter() - t}
