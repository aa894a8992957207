"""QLoRA against LoRA on the CPU: memory and step time, in one run.

    python benchmarks/qlora_memory.py [--steps 10] [--threads 2] [--rounds 1] [--out benchmarks/results]

Every configuration trains the embedded SmolLM2-135M-Instruct with the same LoRA (r 16, alpha 32, the
quickstart's target modules: q/k/v/o/gate/up/down, no dropout), AdamW lr 2e-4, batch 4, max_length 128,
on the first rows of examples/data/dates.jsonl tokenised by edgesmith's ``tokenize_example``, each in its
own process with the same thread count. The models are the ones edgesmith trains: the methods'
``load_base`` + ``wrap`` (``toolchain.training.lora`` / ``toolchain.training.qlora``):

- ``lora``: the float32 base;
- ``qlora nf4``: the base 4-bit NF4 with double quantisation, float32 compute;
- ``qlora fp4``: the same with FP4.

Reported per configuration: peak RSS of the process (``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of the
child, which includes loading), RSS after loading and wrapping the model, the base's
``get_memory_footprint()`` (bytes) and the wrapped model's, the median optimiser-step time over the steps
after one warm-up step, the mean loss of the timed steps, and the machine load (``os.getloadavg()``)
before and after, since other jobs share this CPU. Ratios (memory saved, slowdown) are taken against
``lora`` of the same run, configurations taking turns round after round.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
CACHE = Path(os.environ.get("EDGESMITH_CACHE", Path.home() / ".cache" / "edgesmith"))
CONFIGS = {"lora": None, "qlora nf4": "nf4", "qlora fp4": "fp4"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(job: dict) -> dict:
    import torch
    from transformers import AutoTokenizer

    from toolchain.core.chat import tokenize_example
    from toolchain.pipeline.recipe import LoraSection, QloraSection, TrainSection
    from toolchain.training.batching import PadCollator

    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    quant = job["quant"]
    tcfg = TrainSection(method="qlora" if quant else "lora", lora=LoraSection(rank=16, alpha=32.0, target_modules=TARGETS),
                        qlora=QloraSection(quant_type=quant, double_quant=True, compute_dtype="float32") if quant else None)
    if quant:
        from toolchain.training.qlora import METHOD
    else:
        from toolchain.training.lora import METHOD
    tok = AutoTokenizer.from_pretrained(job["model"])
    rows = [json.loads(line) for line in open(REPO / "examples" / "data" / "dates.jsonl")]
    need = job["batch"] * (job["steps"] + 1)
    examples = [t for t in (tokenize_example(r, tok, job["max_length"]) for r in rows) if t][:need]
    collate = PadCollator(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)

    t0 = time.perf_counter()
    base = METHOD.load_base(Path(job["model"]), tcfg)
    base_footprint = int(base.get_memory_footprint())
    model = METHOD.wrap(base, tcfg)
    load_s = time.perf_counter() - t0
    wrapped_footprint = int(model.get_memory_footprint())
    rss_loaded = rss_mb()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    times, losses = [], []
    for step in range(job["steps"] + 1):
        batch = collate(examples[step * job["batch"]:(step + 1) * job["batch"]])
        t = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t
        if step:  # the first step warms up
            times.append(dt)
            losses.append(float(loss))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"base_footprint_bytes": base_footprint, "wrapped_footprint_bytes": wrapped_footprint,
            "trainable_parameters": int(trainable), "load_s": load_s, "rss_after_load_mb": rss_loaded,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "step_s": times, "step_s_median": statistics.median(times), "mean_loss": statistics.mean(losses),
            "threads": torch.get_num_threads()}


def run_worker(job: dict, work: Path) -> dict:
    path = work / "job.json"
    path.write_text(json.dumps(job))
    before = os.getloadavg()
    proc = subprocess.run([sys.executable, __file__, "--worker", str(path)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"worker {job['name']} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["load_before"], out["load_after"] = before, os.getloadavg()
    return out


def summarise(rows: dict[str, list[dict]]) -> dict:
    summary = {}
    for name, runs in rows.items():
        summary[name] = {
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
            "rss_after_load_mb": statistics.median(r["rss_after_load_mb"] for r in runs),
            "base_footprint_bytes": runs[0]["base_footprint_bytes"],
            "wrapped_footprint_bytes": runs[0]["wrapped_footprint_bytes"],
            "trainable_parameters": runs[0]["trainable_parameters"],
            "step_s_median": statistics.median(r["step_s_median"] for r in runs),
            "step_s_rounds": [r["step_s_median"] for r in runs],
            "mean_loss": statistics.median(r["mean_loss"] for r in runs),
            "load_s": statistics.median(r["load_s"] for r in runs),
            "load_avg": [[round(x, 2) for x in r["load_before"]] + [round(x, 2) for x in r["load_after"]] for r in runs],
        }
    lora = summary["lora"]
    for name, s in summary.items():
        s["footprint_saved"] = 1 - s["base_footprint_bytes"] / lora["base_footprint_bytes"]
        s["peak_rss_saved"] = 1 - s["peak_rss_mb"] / lora["peak_rss_mb"]
        s["rss_after_load_saved"] = 1 - s["rss_after_load_mb"] / lora["rss_after_load_mb"]
        s["slowdown"] = s["step_s_median"] / lora["step_s_median"]
    return summary


def markdown(summary: dict, meta: dict) -> str:
    lines = ["# QLoRA against LoRA: memory and step time", "",
             f"SmolLM2-135M-Instruct, LoRA r16 alpha 32 on {', '.join(TARGETS)}; batch {meta['batch']}, "
             f"max_length {meta['max_length']}, {meta['steps']} timed steps after 1 warm-up, {meta['threads']} threads, "
             f"{meta['rounds']} round(s), each configuration in its own process. {meta['machine']}. "
             "Machine load (1/5/15 min, before and after each run) is shown: other jobs shared the CPU.", "",
             "| config | base footprint MB | saved | wrapped footprint MB | RSS after load MB | saved | peak RSS MB "
             "| saved | step s (median) | slowdown | mean loss | load avg before / after |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, s in summary.items():
        la = "; ".join(f"{r[0]:.1f} / {r[3]:.1f}" for r in s["load_avg"])
        lines.append(f"| {name} | {s['base_footprint_bytes'] / 2**20:.1f} | {s['footprint_saved']:.0%} | "
                     f"{s['wrapped_footprint_bytes'] / 2**20:.1f} | {s['rss_after_load_mb']:.0f} | "
                     f"{s['rss_after_load_saved']:.0%} | {s['peak_rss_mb']:.0f} | {s['peak_rss_saved']:.0%} | "
                     f"{s['step_s_median']:.2f} | {s['slowdown']:.2f}x | {s['mean_loss']:.3f} | {la} |")
    lines += ["", "Footprint: `model.get_memory_footprint()` of the base as loaded for training (parameters and "
              "buffers; a 4-bit base keeps the embedding (tied LM head) and norms in float32: the embedding alone is 28.3M of "
              "SmolLM2's 135M parameters, 113 MB). Peak RSS includes loading (the float32 "
              "checkpoint is read before its linears are quantised) and torch's own allocations. bitsandbytes' "
              "CPU path dequantises every 4-bit weight on each forward and backward (docs/architecture.md, facts), "
              "so QLoRA on the CPU saves memory and costs time.", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--model", help="an HF directory of SmolLM2-135M-Instruct (default: converted from the embedded model)")
    ap.add_argument("--work", default=str(CACHE / "qlora-memory"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(Path(args.worker).read_text())), default=float))
        return 0

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.model:
        model = Path(args.model)
    else:
        from gguf_vs_llamacpp import embedded_hf_dir

        model = embedded_hf_dir(work)
    rows: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    for r in range(args.rounds):
        for name, quant in CONFIGS.items():
            job = {"name": name, "quant": quant, "model": str(model), "threads": args.threads, "steps": args.steps,
                   "batch": args.batch, "max_length": args.max_length}
            rows[name].append(run_worker(job, work))
            x = rows[name][-1]
            print(f"round {r + 1}/{args.rounds} {name}: peak RSS {x['peak_rss_mb']:.0f} MB, footprint "
                  f"{x['base_footprint_bytes'] / 2**20:.1f} MB, step {x['step_s_median']:.2f} s", flush=True)
    summary = summarise(rows)
    meta = {"machine": f"{os.cpu_count()} CPUs", "threads": args.threads, "steps": args.steps, "batch": args.batch,
            "max_length": args.max_length, "rounds": args.rounds, "model": str(model),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from toolchain.core.files import write_json_atomic, write_text_atomic

    write_json_atomic(out / "qlora_memory.json", {"meta": meta, "summary": summary, "runs": rows})
    text = markdown(summary, meta)
    write_text_atomic(out / "qlora_memory.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
