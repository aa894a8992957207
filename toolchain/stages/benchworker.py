"""Benchmark one runtime on one artifact in a fresh process.

Each measurement runs in its own process so peak memory belongs to that runtime alone and a
runtime that crashes (a llama.cpp build dying with SIGILL, say) cannot take the run down.

    python -m toolchain.stages.benchworker JOB.json RESULT.json
"""
from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from toolchain.core.files import write_json_atomic

_BENCH_LIMITS = ("prompt_tokens", "gen_tokens", "repetitions", "warmup")


def run_job(job: dict) -> dict:
    from toolchain.core.benchschema import BenchSettings, rss_mb
    from toolchain.core.metrics import greedy_quality, quality_against
    from toolchain.pipeline.registry import RUNTIMES

    rss0 = rss_mb()
    cls = RUNTIMES.get(job["runtime"]).load()
    rt = cls(job["artifact"], threads=job["settings"]["threads"], **job.get("options", {}))
    t = time.perf_counter()
    rt.load()
    load_s = time.perf_counter() - t
    ref_dir = Path(job["reference"])
    ref = json.loads((ref_dir / "reference.json").read_text())
    # a runtime that cannot afford the full measurement on this machine (WebGPU emulated on the CPU)
    # says how much it runs; the result records it
    limits = dict(getattr(rt, "limits", None) or {})
    settings = BenchSettings(**{k: min(v, limits.get(k, v)) if k in _BENCH_LIMITS else v
                                for k, v in job["settings"].items()})
    result = rt.bench(ref["bench_prompt_ids"], settings, target=job["target"], load_s=load_s, rss_before_load=rss0)
    prompts = ref["greedy_prompt_ids"][: limits.get("greedy_prompts", len(ref["greedy_prompt_ids"]))]
    n_greedy = min(job["greedy_tokens"], limits.get("greedy_tokens", job["greedy_tokens"]))
    greedy = [rt.generate(ids, n_greedy, ref["stop_ids"]) for ids in prompts]
    ref_greedy = [g[:n_greedy] for g in ref["greedy_outputs"][: len(prompts)]]
    if limits.get("logit_positions", 1) > 0:
        logits = rt.logits(ref["quality_ids"])
        result.quality = quality_against(np.load(ref_dir / "logprobs.npy"), logits, ref["quality_ids"],
                                         ref_greedy, greedy)
    else:
        result.quality = greedy_quality(ref_greedy, greedy)
    out = result.to_dict()
    out["greedy_outputs"] = greedy
    if limits:
        out["limits"] = limits
    if getattr(rt, "precision", None):  # a runtime that picks its own file (a browser bundle's dtype)
        out["precision"] = rt.precision
    if hasattr(rt, "close"):
        rt.close()
    return out


def error_path(result_path: str | Path) -> Path:
    """Where a failed job leaves its cause: ``{"type", "message"}`` beside the result it did not write."""
    return Path(str(result_path) + ".error.json")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(argv[0]).read_text())
    try:
        result = run_job(job)
    except Exception as exc:  # the parent reports the cause in one line and keeps this traceback in a log
        traceback.print_exc()
        write_json_atomic(error_path(argv[1]), {"type": type(exc).__name__, "message": str(exc)})
        return 1
    write_json_atomic(Path(argv[1]), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
