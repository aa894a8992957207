"""Stage ``bench``: one runtime on one artifact, in a worker process of its own.

The worker (``toolchain.stages.benchworker``) gets absolute paths and imports this very edgesmith
whatever its working directory; peak memory is its own, and a runtime that crashes (a llama.cpp
build dying with SIGILL, say) fails this stage with its cause in one line and its log kept.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from toolchain.core.errors import StageError, one_line
from toolchain.core.procenv import python_env
from toolchain.pipeline.plan import Context, PlanState, Stage
from toolchain.pipeline.recipe import Recipe

REFERENCE_TARGET = "merged"  # the name the torch row of the model later stages use goes by
PRUNED_TARGET = "pruned"  # its name when a prune stage produced that model


def plan(recipe: Recipe, state: PlanState) -> list[Stage]:
    """``bench-torch``: the model later stages use, on torch, as the reference row."""
    if not recipe.bench.reference:
        return []
    name = PRUNED_TARGET if state.model == "prune" else REFERENCE_TARGET
    return [bench_stage(recipe, "torch", name, state.model, stage_id="bench-torch")]


def bench_stage(recipe: Recipe, runtime: str, target_name: str, source_id: str, stage_id: str | None = None) -> Stage:
    from toolchain.pipeline.registry import RUNTIMES

    sid = stage_id or f"bench-{target_name}-{runtime}"
    summary = (f"benchmark {target_name} on {runtime}" if source_id.startswith("export-")
               else f"benchmark the {target_name} model on torch")
    return Stage(sid, "bench", [source_id, "reference"], {"bench": asdict(recipe.bench), "runtime": runtime},
                 make_bench(runtime, target_name, source_id), summary, target=target_name,
                 roles={"artifact": source_id, "reference": "reference"}, versions=RUNTIMES.get(runtime).versions)


def make_bench(runtime: str, target_name: str, source_id: str) -> Callable:
    exported = source_id.startswith("export-")

    def run_bench(ctx: Context, inputs: dict, out: Path) -> dict:
        b = ctx.recipe.bench
        art = inputs["artifact"]
        settings = {"threads": b.threads, "prompt_tokens": b.prompt_tokens, "gen_tokens": b.gen_tokens,
                    "repetitions": b.repetitions, "warmup": b.warmup}
        options = dict(art.figures.get("runtime_options", {})) if exported else {}
        if "lora_path" in options:  # bundle-relative in the manifest; absolute for the worker
            options["lora_path"] = str((art.path / options["lora_path"]).resolve())
        job = {"runtime": runtime, "artifact": str(art.path.resolve()), "target": target_name,
               "options": options,
               "reference": str(inputs["reference"].path.resolve()), "settings": settings,
               "greedy_tokens": b.greedy_tokens}
        out = out.resolve()
        job_path, result_path = out / "job.json", out / "result.json"
        job_path.write_text(json.dumps(job, indent=1))
        # absolute paths, and the worker imports this very edgesmith whatever the working directory
        proc = subprocess.run([sys.executable, "-m", "toolchain.stages.benchworker", str(job_path), str(result_path)],
                              capture_output=True, text=True, cwd=str(out), env=python_env())
        log = out / "worker.log"
        log.write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0 or not result_path.exists():
            raise StageError(f"benchmark of {target_name} on {runtime}: {worker_cause(proc, result_path)}", log=log)
        result = json.loads(result_path.read_text())
        fig = art.figures
        fmt, precision = (fig.get("format"), fig.get("precision")) if exported else ("torch", "fp32")
        picked = result.get("precision")  # a browser runtime reports the precision of the dtype it loaded
        # the gate is judged when read (toolchain.quality.gates), on the format and this key
        result["format"], result["precision"] = fmt, picked or precision
        result["gate_key"] = picked or (fig.get("gate_key") if exported else None) or result["precision"]
        return result
    return run_bench


def worker_cause(proc: subprocess.CompletedProcess, result_path: Path) -> str:
    """Why a worker process failed, in one line: the exception it reported, else how it ended."""
    from toolchain.stages.benchworker import error_path

    err = error_path(result_path)
    if err.is_file():
        e = json.loads(err.read_text())
        return f"{e['type']}: {one_line(e['message'])}"
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        return f"the worker was killed by {name} (exit code {proc.returncode})"
    last = one_line("\n".join(reversed((proc.stderr or proc.stdout or "").strip().splitlines())))
    return f"the worker exited with code {proc.returncode}" + (f": {last}" if last else " and wrote no result")
