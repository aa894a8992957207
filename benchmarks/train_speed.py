"""LoRA training speed on the CPU: edgesmith against plain transformers Trainer + PEFT, in one run.

    python benchmarks/train_speed.py [--steps 20] [--threads 2] [--rounds 1] [--out benchmarks/results]

Every configuration trains the embedded SmolLM2-135M-Instruct with the same LoRA (r 16, alpha 32,
all linear layers, no dropout), the same hyperparameters (AdamW, lr 2e-4 cosine, batch 4, seed 0,
max_length 256) and the same number of optimiser steps, on the same 40 mixed-length texts, each in
its own process with the same thread count:

- ``plain pad-to-max``: transformers Trainer, the model's own loss, every batch padded to
  max_length (``DataCollatorForSeq2Seq(padding="max_length")``);
- ``plain dynamic``: the same, padded to the longest example of each batch;
- ``edgesmith dynamic``: ``toolchain.training.trainer.train`` with ``data.packing: false``;
- ``edgesmith dynamic + group_by_length``: the same with ``train.group_by_length: true``;
- ``edgesmith packed``: ``data.packing: true`` (padding-free packing: each batch's examples in one
  row, position ids restarting per example).

The data: texts built deterministically from examples/data/dates.jsonl (each text is consecutive
rows written as "Q: ... A: ..." lines, as many as reach a target length drawn log-uniformly between
16 and 320 tokens, then cut at max_length), tokenised once by edgesmith's ``tokenize_example`` (every
token learnt, EOS appended) and handed to every configuration as the same token ids and labels; 8
more texts are the eval set. Steps run over whole epochs, so with the same sampler every
configuration sees the same examples and the same real tokens.

Reported per configuration: real (non-pad) tokens per second over the steps after warm-up (the
sum of their real tokens over the sum of their wall times, and the median of per-step rates),
the padded share, eval loss after training (the token-weighted mean over the eval texts, each run
alone, computed the same way for every configuration), peak RSS of the process, and the machine
load before and after. Ratios are taken between configurations of the same run.

Goal (issue 14): edgesmith packed >= 1.5x edgesmith dynamic, at equal or lower eval loss.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
CACHE = Path(os.environ.get("EDGESMITH_CACHE", Path.home() / ".cache" / "edgesmith"))

CONFIGS = ["plain pad-to-max", "plain dynamic", "edgesmith dynamic", "edgesmith dynamic + group_by_length",
           "edgesmith packed"]
HYPER = dict(batch_size=4, learning_rate=2e-4, lr_scheduler="cosine", seed=0, max_length=256, rank=16, alpha=32.0)
N_TRAIN, N_EVAL, WARMUP_STEPS = 40, 8, 3


def build_texts(tokenizer, n: int, seed: int) -> list[str]:
    """n texts of dates.jsonl rows ("Q: ... A: ..." lines), lengths log-uniform in 16..320 tokens."""
    rows = [json.loads(line) for line in (REPO / "examples" / "data" / "dates.jsonl").read_text().splitlines()]
    lines = [f"Q: {r['messages'][0]['content']} A: {r['messages'][1]['content']}" for r in rows]
    rng = random.Random(seed)
    texts, cursor = [], rng.randrange(len(lines))
    for _ in range(n):
        target = math.exp(rng.uniform(math.log(16), math.log(320)))
        parts: list[str] = []
        while not parts or len(tokenizer("\n".join(parts))["input_ids"]) < target:
            parts.append(lines[cursor % len(lines)])
            cursor += 1
        texts.append("\n".join(parts))
    return texts


def dataset(model_dir: Path) -> tuple[list[dict], list[dict]]:
    from transformers import AutoTokenizer

    from toolchain.core.chat import tokenize_example

    tok = AutoTokenizer.from_pretrained(model_dir)
    train = [tokenize_example({"text": t}, tok, HYPER["max_length"]) for t in build_texts(tok, N_TRAIN, 0)]
    evals = [tokenize_example({"text": t}, tok, HYPER["max_length"]) for t in build_texts(tok, N_EVAL, 1)]
    return train, evals


# ----------------------------------------------------------------------------- the worker

class StepTimer:
    """Wall time of every optimiser step and the real tokens of the batch it used."""

    def __init__(self):
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.padded: list[int] = []
        self._t = None

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class Cb(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                timer._t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                timer.times.append(time.perf_counter() - timer._t)
        return Cb()

    def wrap(self, collate):
        def collated(batch):
            out = collate(batch)
            mask = out.get("attention_mask")
            self.tokens.append(int(mask.sum()) if mask is not None else int(out["input_ids"].numel()))
            self.padded.append(int(out["input_ids"].numel()))
            return out
        return collated


def eval_loss(model, evals: list[dict]) -> float:
    """Token-weighted mean next-token loss over the eval texts, each run alone (the same for every config)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in evals:
            ids = torch.tensor([ex["input_ids"]])
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            target = torch.tensor(ex["labels"][1:])
            keep = target != -100
            total += float(F.cross_entropy(logits[keep], target[keep], reduction="sum"))
            count += int(keep.sum())
    return total / count


def run_plain(job: dict, train: list[dict], timer: StepTimer):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    model_dir = Path(job["model_dir"])
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=HYPER["rank"], lora_alpha=HYPER["alpha"], lora_dropout=0.0,
                                             target_modules="all-linear", bias="none", task_type="CAUSAL_LM"))
    pad_max = job["name"] == "plain pad-to-max"
    collate = DataCollatorForSeq2Seq(tok, padding="max_length" if pad_max else "longest",
                                     max_length=HYPER["max_length"] if pad_max else None, label_pad_token_id=-100)
    args = TrainingArguments(output_dir=job["work"], per_device_train_batch_size=HYPER["batch_size"],
                             learning_rate=HYPER["learning_rate"], lr_scheduler_type=HYPER["lr_scheduler"],
                             max_steps=job["steps"], seed=HYPER["seed"], data_seed=HYPER["seed"], logging_steps=5,
                             save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True,
                             dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False)
    from toolchain.training.trainer import ListDataset

    trainer = Trainer(model=model, args=args, train_dataset=ListDataset(train), data_collator=timer.wrap(collate),
                      callbacks=[timer.callback()])
    trainer.train()
    return model


def run_edgesmith(job: dict, train: list[dict], timer: StepTimer):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import toolchain.training.trainer as harness
    from toolchain.pipeline.recipe import DataSection, TrainSection
    from toolchain.training.lora import Lora

    class TimedLora(Lora):
        def callbacks(self, model, tcfg):
            return [timer.callback()]

    real_collator_for = harness.collator_for
    harness.collator_for = lambda packing, pad_id: timer.wrap(real_collator_for(packing, pad_id))
    harness.tokenize_all = lambda examples, tokenizer, dcfg: (list(examples), 0)  # already tokenised, same ids
    dcfg = DataSection(path="-", max_length=HYPER["max_length"], packing=job["name"] == "edgesmith packed")
    tcfg = TrainSection(max_steps=job["steps"], batch_size=HYPER["batch_size"], learning_rate=HYPER["learning_rate"],
                        lr_scheduler=HYPER["lr_scheduler"], seed=HYPER["seed"], eval_every="no",
                        save_checkpoints=False, logging_steps=5, threads=job["threads"],
                        group_by_length="group_by_length" in job["name"])
    tcfg.lora.rank, tcfg.lora.alpha, tcfg.lora.target_modules = HYPER["rank"], HYPER["alpha"], ["all-linear"]
    out = Path(job["work"]) / "adapter"
    harness.train(Path(job["model_dir"]), train, [], tcfg, dcfg, out, TimedLora(), progress=False)
    base = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32)
    return PeftModel.from_pretrained(base, out)


def worker(job: dict) -> dict:
    import torch

    torch.set_num_threads(job["threads"])
    train, evals = dataset(Path(job["model_dir"]))
    timer = StepTimer()
    t0 = time.perf_counter()
    model = (run_plain if job["name"].startswith("plain") else run_edgesmith)(job, train, timer)
    wall = time.perf_counter() - t0
    loss = eval_loss(model, evals)
    # the collator also runs once per step; a step's batch is the one collated just before it
    steps = list(zip(timer.times, timer.tokens, timer.padded))[WARMUP_STEPS:]
    return {
        "name": job["name"], "steps": len(timer.times), "real_tokens": sum(timer.tokens[:len(timer.times)]),
        "computed_tokens": sum(timer.padded[:len(timer.times)]),
        "real_tok_s": sum(n for _, n, _ in steps) / sum(t for t, _, _ in steps),
        "real_tok_s_median_step": statistics.median(n / t for t, n, _ in steps),
        "step_s_median": statistics.median(t for t, _, _ in steps),
        "eval_loss": loss, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "wall_s": wall, "torch_threads": torch.get_num_threads(),
    }


def run_worker_process(job: dict, work: Path) -> dict:
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        job = {**job, "work": tmp}
        spec = Path(tmp) / "job.json"
        spec.write_text(json.dumps(job))
        load_before = os.getloadavg()
        proc = subprocess.run([sys.executable, __file__, "--worker", str(spec)], capture_output=True, text=True,
                              cwd=tmp)
        if proc.returncode:
            raise RuntimeError(f"{job['name']} failed:\n{proc.stderr[-3000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**row, "loadavg_before": load_before, "loadavg_after": os.getloadavg()}


# ----------------------------------------------------------------------------- the report

def markdown(summary: dict, ratios: dict, meta: dict) -> str:
    lines = ["# LoRA training speed on the CPU (issue 14)", "",
             f"SmolLM2-135M-Instruct, LoRA r{HYPER['rank']} all-linear, batch {HYPER['batch_size']}, max_length "
             f"{HYPER['max_length']}, {meta['threads']} threads, {meta['steps']} optimiser steps "
             f"({meta['train_texts']} texts, {meta['epochs']:.0f} epochs), {meta['rounds']} round(s); {meta['machine']}. "
             f"Warm-up: the first {WARMUP_STEPS} steps are left out of the rates.", "",
             "| configuration | real tok/s | median step real tok/s | padded share | real tokens | eval loss | "
             "peak RSS MB | load before→after |", "|---|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['real_tok_s']:.1f} | {s['real_tok_s_median_step']:.1f} | "
                     f"{1 - s['real_tokens'] / s['computed_tokens']:.2f} | {s['real_tokens']} | {s['eval_loss']:.4f} | "
                     f"{s['peak_rss_mb']:.0f} | {s['loadavg_before']:.1f}→{s['loadavg_after']:.1f} |")
    lines += ["", "| ratio (same run) | real tok/s | median step | goal |", "|---|---|---|---|"]
    for name, r in ratios.items():
        lines.append(f"| {name} | {r['real_tok_s']:.2f}x | {r['median_step']:.2f}x | {r.get('goal', '')} |")
    lines += ["", f"Eval loss before training: {meta['eval_loss_base']:.4f}. Machine load (1-minute average) is "
              "recorded before and after each configuration: other jobs shared these 2 cores."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--work", default=str(CACHE / "train-speed"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(Path(args.worker).read_text()))))
        return 0

    import torch
    from transformers import AutoModelForCausalLM

    from gguf_vs_llamacpp import embedded_hf_dir
    from toolchain.core.files import write_json_atomic, write_text_atomic

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = embedded_hf_dir(work)
    train, evals = dataset(model_dir)
    torch.set_num_threads(args.threads)
    base_loss = eval_loss(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), evals)
    names = [n for n in args.configs.split(",") if n]
    rows: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names:
            job = {"name": name, "model_dir": str(model_dir), "threads": args.threads, "steps": args.steps}
            rows[name].append(run_worker_process(job, work))
            print(f"round {r + 1}/{args.rounds} {name}: {rows[name][-1]['real_tok_s']:.1f} real tok/s, "
                  f"eval loss {rows[name][-1]['eval_loss']:.4f}", flush=True)
    summary = {}
    for name, rs in rows.items():
        s = {k: statistics.median(x[k] for x in rs) for k in ("real_tok_s", "real_tok_s_median_step", "step_s_median",
                                                               "eval_loss", "peak_rss_mb", "wall_s")}
        s.update(real_tokens=rs[0]["real_tokens"], computed_tokens=rs[0]["computed_tokens"], steps=rs[0]["steps"],
                 loadavg_before=rs[0]["loadavg_before"][0], loadavg_after=rs[-1]["loadavg_after"][0],
                 rounds=[{k: x[k] for k in ("real_tok_s", "eval_loss", "loadavg_before", "loadavg_after")} for x in rs])
        summary[name] = s
    ratios = {}
    pairs = [("edgesmith packed", "edgesmith dynamic", 1.5), ("edgesmith packed", "plain dynamic", None),
             ("edgesmith packed", "plain pad-to-max", None), ("edgesmith dynamic", "plain dynamic", None),
             ("edgesmith dynamic + group_by_length", "edgesmith dynamic", None)]
    for a, b, goal in pairs:
        if a in summary and b in summary:
            ratios[f"{a} / {b}"] = {"real_tok_s": summary[a]["real_tok_s"] / summary[b]["real_tok_s"],
                                    "median_step": summary[a]["real_tok_s_median_step"]
                                    / summary[b]["real_tok_s_median_step"], **({"goal": goal} if goal else {})}
    lengths = [len(e["input_ids"]) for e in train]
    meta = {"machine": f"{os.cpu_count()} CPUs", "threads": args.threads, "steps": args.steps, "rounds": args.rounds,
            "train_texts": len(train), "eval_texts": len(evals), "epochs": args.steps * HYPER["batch_size"] / len(train),
            "lengths": {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths),
                        "mean": statistics.mean(lengths)},
            "hyperparameters": HYPER, "warmup_steps": WARMUP_STEPS, "eval_loss_base": base_loss,
            "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "peft": __import__("peft").__version__}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "train_speed.json", {"meta": meta, "summary": summary, "ratios": ratios})
    text = markdown(summary, ratios, meta)
    write_text_atomic(out / "train_speed.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
