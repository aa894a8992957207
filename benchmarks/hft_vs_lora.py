"""Half fine-tuning (train.method: hft) against LoRA on the embedded SmolLM2-135M-Instruct.

Same data, steps and batch as the quickstart (examples/data/dates.jsonl, 240 training rows, 48 eval
rows, batch 8, one epoch = 30 steps, cosine with 10% warm-up); LoRA at the quickstart's r16 / lr
2e-3; HFT at full-parameter learning rates; and, as the paper's control, full fine-tuning (hft with
fraction 1.0, one round) at HFT's higher rate. Per method: median optimiser step time, the final
eval loss on the dates task, and forgetting: perplexity of the model on held-out general English
prose (the GNU GPL v3 text shipped in /usr/share/common-licenses/GPL-3, its first ``--ppl-tokens``
tokens in 256-token windows) before and after training. Each method trains in its own subprocess
with 2 torch threads; the machine's load average is recorded (other jobs may share the CPU).

    .venv/bin/python benchmarks/hft_vs_lora.py            # writes benchmarks/results/hft_vs_lora.{json,md}
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
GENERAL_TEXT = Path("/usr/share/common-licenses/GPL-3")
THREADS = 2
# name, method, learning rate, extra train settings
RUNS = [
    ("lora r16 lr 2e-3", "lora", 2e-3, {}),
    ("hft lr 1e-4", "hft", 1e-4, {}),
    ("hft lr 2e-5", "hft", 2e-5, {}),
    ("full FT lr 1e-4", "hft", 1e-4, {"hft": {"fraction": 1.0, "rounds": 1}}),
]


def embedded_hf_dir(work: Path) -> Path:
    from toolchain.core.models import load_model_and_tokenizer, resolve_source, save_hf_dir

    out = work / "smollm2-135m-instruct"
    if not (out / "config.json").exists():
        model, tok = load_model_and_tokenizer(resolve_source("smollm2-135m-instruct"))
        save_hf_dir(model, tok, out)
    return out


def general_ppl(model, tokenizer, n_tokens: int, window: int = 256) -> float:
    import torch

    ids = tokenizer(GENERAL_TEXT.read_text())["input_ids"][:n_tokens]
    nll, count = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[start:start + window + 1]])
            if chunk.shape[1] < 2:
                break
            logits = model(input_ids=chunk[:, :-1]).logits.float()
            nll += torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
            count += chunk.shape[1] - 1
    return math.exp(nll / count)


def worker(spec: dict) -> dict:
    """One method in this process: train, then score forgetting on the general text."""
    import torch
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from toolchain.pipeline.recipe import load_recipe
    from toolchain.stages.data import load_splits
    from toolchain.training import trainer as harness
    from toolchain.training.method import method_for

    torch.set_num_threads(THREADS)
    base = Path(spec["base"])
    # the quickstart's data and train sections (its targets include gguf-lora, which hft refuses)
    doc = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    doc = {"name": "bench", "model": doc["model"], "data": {**doc["data"], "path": str(REPO / "examples" / doc["data"]["path"])},
           "train": doc["train"]}
    path = Path(spec["out"]).with_suffix(".yaml")
    path.write_text(yaml.safe_dump(doc))
    recipe = load_recipe(path, overrides={
        "train.method": spec["method"], "train.learning_rate": spec["lr"], "train.save_checkpoints": False,
        "train.threads": THREADS, **{f"train.{k}": v for k, v in spec["extra"].items()}})
    train_rows, eval_rows, _ = load_splits(recipe.data, path.parent)
    method = method_for(spec["method"])
    steps: list[float] = []

    class Timed(type(method)):
        def callbacks(self, model, tcfg):
            class StepTimer(TrainerCallback):
                def on_step_begin(self, *a, **k):
                    self.t = time.perf_counter()

                def on_step_end(self, *a, **k):
                    steps.append(time.perf_counter() - self.t)
            return list(super().callbacks(model, tcfg)) + [StepTimer()]

    out = Path(spec["out"])
    figures = harness.train(base, train_rows, eval_rows, recipe.train, recipe.data, out, Timed(), progress=False)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if spec["method"] == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), out)
        model = model.merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    rounds = json.loads((out / "hft_rounds.json").read_text()) if (out / "hft_rounds.json").exists() else []
    return {"steps": figures["steps"], "median_step_s": statistics.median(steps), "step_s": steps,
            "eval_loss": figures["eval_loss"], "first_loss": figures["first_loss"], "final_loss": figures["final_loss"],
            "trainable_parameters": figures["trainable_parameters"], "total_parameters": figures["total_parameters"],
            "rounds": [{k: r[k] for k in ("round", "from_step", "share", "layer_share")} for r in rounds],
            "ppl_after": general_ppl(model, tokenizer, spec["ppl_tokens"]), "loadavg_end": os.getloadavg()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "edgesmith-hft-bench")
    ap.add_argument("--ppl-tokens", type=int, default=2048)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))))
        return 0

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args.work.mkdir(parents=True, exist_ok=True)
    base = embedded_hf_dir(args.work)
    torch.set_num_threads(THREADS)
    ppl_before = general_ppl(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                             AutoTokenizer.from_pretrained(base), args.ppl_tokens)
    rows = []
    for name, method, lr, extra in RUNS:
        spec = {"base": str(base), "method": method, "lr": lr, "extra": extra, "ppl_tokens": args.ppl_tokens,
                "out": str(args.work / name.replace(" ", "_"))}
        load0 = os.getloadavg()
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": str(THREADS)})
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"{name}: worker failed (exit {proc.returncode})")
        res = json.loads(line[len("RESULT "):])
        res.update(name=name, method=method, learning_rate=lr, extra=extra, wall_s=time.perf_counter() - t,
                   loadavg_start=load0, ppl_before=ppl_before,
                   forgetting_ppl_rel=(res["ppl_after"] - ppl_before) / ppl_before)
        rows.append(res)
        print(f"{name}: median step {res['median_step_s']:.2f} s, eval loss {res['eval_loss']:.4f}, "
              f"general ppl {ppl_before:.2f} -> {res['ppl_after']:.2f}", flush=True)

    doc = {"benchmark": "hft_vs_lora", "model": "SmolLM2-135M-Instruct (embedded, dequantised Q4_1 GGUF -> fp32)",
           "data": "examples/data/dates.jsonl as in examples/quickstart.yaml (240 train / 48 eval rows, batch 8, "
                   "1 epoch = 30 steps, cosine, warmup 0.1)",
           "general_text": f"{GENERAL_TEXT} (first {args.ppl_tokens} tokens, 256-token windows)",
           "threads": THREADS, "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                          "processor": platform.processor()},
           "ppl_before": ppl_before, "runs": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    from toolchain.core.files import write_json_atomic, write_text_atomic

    write_json_atomic(RESULTS / "hft_vs_lora.json", doc)
    write_text_atomic(RESULTS / "hft_vs_lora.md", render(doc))
    print(render(doc))
    return 0


def render(doc: dict) -> str:
    lines = ["# HFT vs LoRA on SmolLM2-135M-Instruct", "",
             f"Data: {doc['data']}. Forgetting: perplexity on {doc['general_text']}, base model "
             f"{doc['ppl_before']:.3f}. {doc['threads']} torch threads, each method in its own process.", "",
             "| method | trainable params | median step (s) | eval loss | general ppl after | Δ ppl | load avg (start → end) |",
             "|---|---|---|---|---|---|---|"]
    for r in doc["runs"]:
        share = r["trainable_parameters"] / r["total_parameters"]
        lines.append(f"| {r['name']} | {r['trainable_parameters'] / 1e6:.2f} M ({share:.1%}) | {r['median_step_s']:.2f} | "
                     f"{r['eval_loss']:.4f} | {r['ppl_after']:.3f} | {r['forgetting_ppl_rel']:+.1%} | "
                     f"{r['loadavg_start'][0]:.1f} → {r['loadavg_end'][0]:.1f} |")
    hft_rows = [r for r in doc["runs"] if r["rounds"] and len(r["rounds"]) > 1]
    if hft_rows:
        r = hft_rows[0]
        lines += ["", f"HFT rounds ({r['name']}): " + ", ".join(
            f"round {x['round']} from step {x['from_step']}: {x['share']:.1%} of the model, {x['layer_share']:.1%} "
            "of the decoder layers" for x in r["rounds"])]
    lines += ["", "The trainable count is round 0's for HFT (each round draws anew). The machine is shared: "
              "step times are comparable only within one run, and only when the load averages are alike."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
