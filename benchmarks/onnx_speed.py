"""edgesmith's int4 ONNX against llama.cpp Q4_0 and against the obvious ONNX path, in one run.

    python benchmarks/onnx_speed.py [--rounds 5] [--threads 2] [--out benchmarks/results]

Candidates, all from the embedded SmolLM2-135M-Instruct (the same HF directory):

- edgesmith ONNX int4 (block 32 and 128, symmetric, accuracy level 4, LM head quantised), int8
  and fp32, run by onnxruntime (``runtimes.onnxruntime_runtime``);
- llama.cpp Q4_0 (edgesmith's GGUF writer + llama.cpp's own quantiser), run by llama.cpp with
  the same thread count;
- the obvious path: optimum-onnx export + onnxruntime ``quantize_dynamic`` int8
  (``benchmarks/obvious_onnx.py``), run by the same onnxruntime runtime.

Every measurement runs in its own process (``--worker``), one repetition per process, and the
candidates take turns round after round, so slow drift of the machine (other jobs, thermal)
spreads over all of them instead of landing on one; medians over rounds are reported, and the
ratios are taken between medians of the same run. Quality beside speed: next-token top-1
agreement with transformers fp32 on the held-out text. Where the time goes: onnxruntime's
per-operator profile of decode steps for the ONNX candidates.

Goals (issue 4): int4 decode >= llama.cpp Q4_0, and >= 1.5x the obvious path.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
CACHE = Path(os.environ.get("EDGESMITH_CACHE", Path.home() / ".cache" / "edgesmith"))

ONNX_VARIANTS = {
    # the quickstart's int4 (its importance matrix changes values, not layout or speed)
    "edgesmith int4 b32 asym, int8 head, int4 embedding": {"precision": "int4", "block_size": 32, "symmetric": False,
                                                           "quantize_embedding": True},
    "edgesmith int4 b32 sym, int4 head": {"precision": "int4", "block_size": 32, "lm_head": "int4"},
    "edgesmith int4 b128 asym, int8 head": {"precision": "int4", "block_size": 128, "symmetric": False},
    "edgesmith int8": {"precision": "int8"},
    "edgesmith fp32": {"precision": "fp32"},
}
OBVIOUS = "obvious: optimum + quantize_dynamic int8"


def build_all(work: Path) -> dict[str, tuple[str, Path]]:
    """name -> (runtime, artifact dir)."""
    from gguf_vs_llamacpp import embedded_hf_dir
    from obvious_onnx import build_obvious_int8

    from exporters.gguf.export import export as export_gguf
    from exporters.onnx import export as export_onnx

    hf = embedded_hf_dir(work)
    out: dict[str, tuple[str, Path]] = {}
    for name, options in ONNX_VARIANTS.items():
        d = work / name.replace(" ", "-")
        if not (d / "model.onnx").exists():
            export_onnx(hf, d, {**options, "genai": False})
        out[name] = ("onnxruntime", d)
    q4 = work / "gguf-q4_0"
    if not q4.exists():
        export_gguf(hf, q4, {"quant": "Q4_0"})
    out["llama.cpp Q4_0"] = ("llama.cpp", q4)
    out[OBVIOUS] = ("onnxruntime", build_obvious_int8(hf, work))
    out["optimum fp32 (before quantize_dynamic)"] = ("onnxruntime", work / "optimum-fp32")
    return out


def reference(work: Path, hf: Path) -> tuple[list[int], list[int], Path]:
    """Prompt ids for the speed runs, held-out ids for quality, and transformers' logits for them."""
    from transformers import AutoTokenizer

    from runtimes.torch_runtime import TorchRuntime
    from toolchain.core.prompts import QUALITY_TEXT

    tok = AutoTokenizer.from_pretrained(hf)
    quality_ids = tok(QUALITY_TEXT, add_special_tokens=False)["input_ids"][:256]
    prompt_ids = (quality_ids * 4)[:128]
    ref = work / "reference-logits.npy"
    if not ref.exists():
        rt = TorchRuntime(hf, threads=2)
        rt.load()
        np.save(ref, rt.logits(quality_ids))
    return prompt_ids, quality_ids, ref


def worker(job: dict) -> dict:
    """One repetition of one candidate (and its quality, first round only)."""
    from toolchain.core.benchschema import BenchSettings
    from toolchain.pipeline.registry import RUNTIMES

    rt = RUNTIMES.get(job["runtime"]).load()(job["artifact"], threads=job["threads"])
    settings = BenchSettings(threads=job["threads"], prompt_tokens=len(job["prompt_ids"]), gen_tokens=job["gen_tokens"],
                             repetitions=1, warmup=1)
    result = rt.bench(job["prompt_ids"], settings, target=job["name"]).to_dict()
    if job.get("quality_ids"):
        ref = np.load(job["reference"])
        got = rt.logits(job["quality_ids"])
        result["top1_vs_torch"] = float((got.argmax(-1) == ref.argmax(-1)).mean())
    return result


def profile_decode(model_dir: Path, threads: int, steps: int = 24) -> dict[str, float]:
    """Milliseconds per decode step by operator type (onnxruntime's profiler)."""
    import onnxruntime as ort

    from runtimes.onnxruntime_runtime import OnnxRuntime

    rt = OnnxRuntime(model_dir, threads=threads)
    rt.load()
    _, state = rt.prefill(list(range(100, 116)))
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "decode")
    rt.session = ort.InferenceSession(str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    for _ in range(steps):
        _, state = rt.decode(state, 5)
    events = json.loads(Path(rt.session.end_profiling()).read_text())
    per_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"] / 1000 / steps
    return {op: round(ms, 3) for op, ms in per_op.most_common(8)}


def run_worker_process(job: dict, work: Path) -> dict:
    path = work / "job.json"
    path.write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, __file__, "--worker", str(path)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"worker for {job['name']} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(rows: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    for name, runs in rows.items():
        med = lambda key: statistics.median(r[key]["median"] for r in runs)  # noqa: E731
        out[name] = {"decode_tps": med("decode_tps"), "prefill_tps": med("prefill_tps"),
                     "decode_tps_rounds": [round(r["decode_tps"]["median"], 2) for r in runs],
                     "size_mb": runs[0].get("artifact_mb"), "top1_vs_torch": runs[0].get("top1_vs_torch"),
                     "peak_rss_mb": runs[0].get("peak_rss_mb"), "busy_cores": [r.get("machine", {}).get("busy_cores")
                                                                              for r in runs]}
    return out


def markdown(summary: dict, ratios: dict, profiles: dict, meta: dict) -> str:
    lines = ["# ONNX int4 speed: edgesmith vs llama.cpp Q4_0 vs the obvious path", "",
             f"{meta['machine']}; {meta['threads']} threads, {meta['prompt_tokens']}-token prompt, "
             f"{meta['gen_tokens']} generated tokens; median of {meta['rounds']} rounds, candidates interleaved.", "",
             "| candidate | size MB | prefill tok/s | decode tok/s | top-1 vs torch |", "|---|---:|---:|---:|---:|"]
    for name, s in summary.items():
        top1 = "" if s["top1_vs_torch"] is None else f"{s['top1_vs_torch']:.1%}"
        size = "" if s["size_mb"] is None else f"{s['size_mb']:.1f}"
        lines.append(f"| {name} | {size} | {s['prefill_tps']:.0f} | {s['decode_tps']:.1f} | {top1} |")
    lines += ["", "## Ratios (decode, prefill)", "",
              "Ratios of the medians over rounds; the round-by-round ratios pair measurements taken seconds apart.", ""]
    for name, r in ratios.items():
        verdict = "" if r.get("goal") is None else (" — goal met" if r["decode"] >= r["goal"] else f" — goal {r['goal']}x missed")
        lines.append(f"- {name}: decode {r['decode']:.2f}x (round by round: {', '.join(f'{p:.2f}' for p in r['decode_paired'])}; "
                     f"median {r['decode_paired_median']:.2f}x), prefill {r['prefill']:.2f}x{verdict}")
    lines += ["", "## Where decode time goes (ms per step, onnxruntime profiler)", ""]
    for name, ops in profiles.items():
        lines.append(f"- {name}: " + ", ".join(f"{op} {ms:.2f}" for op, ms in ops.items()))
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--work", default=str(CACHE / "onnx-speed"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(Path(args.worker).read_text())), default=float))
        return 0

    from gguf_vs_llamacpp import bandwidth_gbs, embedded_hf_dir

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    candidates = build_all(work)
    prompt_ids, quality_ids, ref = reference(work, embedded_hf_dir(work))
    rows: dict[str, list[dict]] = {name: [] for name in candidates}
    for r in range(args.rounds):
        for name, (runtime, artifact) in candidates.items():
            job = {"name": name, "runtime": runtime, "artifact": str(artifact), "threads": args.threads,
                   "prompt_ids": prompt_ids, "gen_tokens": args.gen_tokens, "reference": str(ref),
                   "quality_ids": quality_ids if r == 0 else None}
            rows[name].append(run_worker_process(job, work))
            print(f"round {r + 1}/{args.rounds} {name}: decode {rows[name][-1]['decode_tps']['median']:.1f} tok/s",
                  flush=True)
    summary = summarise(rows)
    ratios = {}
    for name in [n for n in ONNX_VARIANTS if "int4" in n]:
        for base, goal in (("llama.cpp Q4_0", 1.0), (OBVIOUS, 1.5)):
            b = summary[base]
            paired = [x / y for x, y in zip(summary[name]["decode_tps_rounds"], b["decode_tps_rounds"])]
            ratios[f"{name} / {base}"] = {"decode": summary[name]["decode_tps"] / b["decode_tps"],
                                          "prefill": summary[name]["prefill_tps"] / b["prefill_tps"], "goal": goal,
                                          "decode_paired_median": statistics.median(paired),
                                          "decode_paired": [round(p, 2) for p in paired]}
    meta = {"machine": f"{os.cpu_count()} CPUs, read bandwidth {bandwidth_gbs():.1f} GB/s", "threads": args.threads,
            "prompt_tokens": len(prompt_ids), "gen_tokens": args.gen_tokens, "rounds": args.rounds}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"meta": meta, "summary": summary, "ratios": ratios, "decode_profile_ms": {}}
    (out / "onnx_speed.json").write_text(json.dumps(results, indent=2, default=float))  # before the profiles
    profiles = {name: profile_decode(artifact, args.threads) for name, (runtime, artifact) in candidates.items()
                if runtime == "onnxruntime"}
    results["decode_profile_ms"] = profiles
    (out / "onnx_speed.json").write_text(json.dumps(results, indent=2, default=float))
    text = markdown(summary, ratios, profiles, meta)
    (out / "onnx_speed.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
