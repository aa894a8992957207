"""The stages of a run and how a recipe becomes a plan of them.

A stage is a function from input artifact directories to one output directory, plus the config
its cache key hashes. Adding a capability (prune, calibrate, DPO, a new target) means adding a
stage builder here and a module for its work, not changing the runner.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from toolchain.artifacts import Artifact, fingerprint_path
from toolchain.errors import EdgesmithError, StageError, one_line
from toolchain.procenv import python_env
from toolchain.recipe import Recipe

ROLE_ORDER = ("data", "model", "train", "merge", "eval", "reference", "calibrate", "imatrix", "export", "bench",
              "report")


@dataclass
class Context:
    recipe: Recipe
    progress: bool = True
    resume: bool = False
    log: Callable[[str], None] = print


@dataclass
class Stage:
    id: str  # unique in the plan, names the output directory: "export-onnx-fp32"
    kind: str  # one of ROLE_ORDER
    inputs: list[str]  # ids of the stages it reads
    config: dict  # hashed into the cache key
    run: Callable[[Context, dict[str, Artifact], Path], dict] = field(repr=False)
    summary: str = ""


# -- stage bodies ---------------------------------------------------------------------------------

def run_model(ctx: Context, inputs: dict[str, Artifact], out: Path) -> dict:
    from toolchain.models import load_model_and_tokenizer, resolve_source, save_hf_dir

    m = ctx.recipe.model
    src = resolve_source(m.source, ctx.recipe.base_dir, m.gguf_file)
    ctx.log(f"  loading {src.description}")
    model, tok = load_model_and_tokenizer(src, m.dtype, m.trust_remote_code, m.revision)
    save_hf_dir(model, tok, out)
    return {"source": src.description, "kind": src.kind, "architecture": type(model).__name__,
            "model_type": model.config.model_type, "parameters": int(sum(p.numel() for p in model.parameters())),
            "layers": model.config.num_hidden_layers, "hidden_size": model.config.hidden_size,
            "vocab_size": model.config.vocab_size, "chat_template": bool(getattr(tok, "chat_template", None))}


def run_data(ctx: Context, inputs: dict[str, Artifact], out: Path) -> dict:
    from toolchain import data as data_mod

    train, evals, stats = data_mod.load_splits(ctx.recipe.data, ctx.recipe.base_dir)
    for name, rows in (("train.jsonl", train), ("eval.jsonl", evals)):
        with open(out / name, "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return stats


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_train(ctx: Context, inputs: dict[str, Artifact], out: Path) -> dict:
    from toolchain import train as train_mod

    d = inputs["data"].path
    return train_mod.train(inputs["model"].path, read_jsonl(d / "train.jsonl"), read_jsonl(d / "eval.jsonl"),
                           ctx.recipe.train, ctx.recipe.data, out, resume=ctx.resume, progress=ctx.progress)


def run_merge(ctx: Context, inputs: dict[str, Artifact], out: Path) -> dict:
    from toolchain.merge import merge

    return merge(inputs["model"].path, inputs["train"].path, out, ctx.recipe.merge.dtype)


def run_eval(ctx: Context, inputs: dict[str, Artifact], out: Path) -> dict:
    from toolchain.evaluate import task_metric

    examples = read_jsonl(inputs["data"].path / "eval.jsonl")
    ecfg = ctx.recipe.eval
    after = task_metric(inputs["merge"].path, examples, ecfg, ctx.progress)
    before = task_metric(inputs["model"].path, examples, ecfg, ctx.progress) if ecfg.before else None
    (out / "outputs.json").write_text(json.dumps({"before": before, "after": after}, indent=1, ensure_ascii=False))
    samples = []
    for i, a in enumerate(after["outputs"][:8]):
        samples.append({"prompt": a["prompt"], "reference": a["reference"], "after": a["output"],
                        "before": before["outputs"][i]["output"] if before else None})
    return {"metric": ecfg.metric, "examples": after["examples"], "after": after["score"],
            "before": before["score"] if before else None, "samples": samples}


def run_reference(ctx: Context, inputs: dict[str, Artifact], out: Path) -> dict:
    from toolchain.evaluate import write_reference

    examples = read_jsonl(inputs["data"].path / "eval.jsonl") if "data" in inputs else []
    return write_reference(inputs["merge"].path, examples, ctx.recipe.bench, out)


def run_imatrix(ctx: Context, inputs: dict[str, Artifact], out: Path) -> dict:
    from exporters.gguf.imatrix import compute_imatrix, save_imatrix

    batches = json.loads((inputs["calibrate"].path / "calibration.json").read_text())["batches"]
    model_dir = inputs["merge"].path
    model_type = json.loads((model_dir / "config.json").read_text()).get("model_type", "llama")
    t = time.perf_counter()
    data = compute_imatrix(model_dir, batches, family=model_type)
    save_imatrix(data, out / "imatrix.gguf")
    return {"entries": len(data), "tokens": sum(len(b) for b in batches), "compute_s": time.perf_counter() - t}


def run_calibrate(ctx: Context, inputs: dict[str, Artifact], out: Path) -> dict:
    from toolchain.evaluate import calibration_sample

    rows = read_jsonl(inputs["data"].path / "train.jsonl") if "data" in inputs else []
    return calibration_sample(inputs["model"].path, rows, ctx.recipe.calibrate, out)


def export_extras(entry, inputs: dict[str, Artifact]) -> dict:
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
        extras["base_dir"] = inputs["model"].path
    return extras


def preflight_targets(recipe: Recipe, model_dir: Path) -> None:
    """Every target's preflight on the base model, right after it is loaded and before training:
    an unsupported architecture or setting is reported in seconds, not after the fine-tune."""
    from toolchain.registry import EXPORTERS

    for t in recipe.targets:
        entry = EXPORTERS.get(t.format)
        module = __import__(entry.target.split(":")[0], fromlist=["preflight"])
        if hasattr(module, "preflight"):
            module.preflight(model_dir, t.options)


def make_export(target) -> Callable:
    def run_export(ctx: Context, inputs: dict[str, Artifact], out: Path) -> dict:
        from toolchain.registry import EXPORTERS

        entry = EXPORTERS.get(target.format)
        module = __import__(entry.target.split(":")[0], fromlist=["preflight"])
        if hasattr(module, "preflight"):
            module.preflight(inputs["merge"].path, target.options)
        t = time.perf_counter()
        info = entry.load()(inputs["merge"].path, out, target.options, **export_extras(entry, inputs))
        info = dict(info or {})
        info.update(target=target.name, format=target.format, export_s=time.perf_counter() - t)
        return info
    return run_export


def make_bench(runtime: str, target_name: str, source_id: str) -> Callable:
    def run_bench(ctx: Context, inputs: dict[str, Artifact], out: Path) -> dict:
        b = ctx.recipe.bench
        settings = {"threads": b.threads, "prompt_tokens": b.prompt_tokens, "gen_tokens": b.gen_tokens,
                    "repetitions": b.repetitions, "warmup": b.warmup}
        options = dict(inputs[source_id].figures.get("runtime_options", {})) if source_id.startswith("export-") else {}
        if "lora_path" in options:  # bundle-relative in the manifest; absolute for the worker
            options["lora_path"] = str((inputs[source_id].path / options["lora_path"]).resolve())
        job = {"runtime": runtime, "artifact": str(inputs[source_id].path.resolve()), "target": target_name,
               "options": options,
               "reference": str(inputs["reference"].path.resolve()), "settings": settings,
               "greedy_tokens": b.greedy_tokens}
        out = out.resolve()
        job_path, result_path = out / "job.json", out / "result.json"
        job_path.write_text(json.dumps(job, indent=1))
        # absolute paths, and the worker imports this very edgesmith whatever the working directory
        proc = subprocess.run([sys.executable, "-m", "toolchain.benchworker", str(job_path), str(result_path)],
                              capture_output=True, text=True, cwd=str(out), env=python_env())
        log = out / "worker.log"
        log.write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0 or not result_path.exists():
            raise StageError(f"benchmark of {target_name} on {runtime}: {worker_cause(proc, result_path)}", log=log)
        result = json.loads(result_path.read_text())
        fig = inputs[source_id].figures
        fmt, precision = (fig.get("format"), fig.get("precision")) if source_id.startswith("export-") else ("torch", "fp32")
        # the gate is judged when read (toolchain.gates); a browser runtime reports the dtype it picked
        result["format"], result["precision"] = fmt, result.get("precision") or precision
        return result
    return run_bench


def worker_cause(proc: subprocess.CompletedProcess, result_path: Path) -> str:
    """Why a worker process failed, in one line: the exception it reported, else how it ended."""
    from toolchain.benchworker import error_path

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


def run_report(ctx: Context, inputs: dict[str, Artifact], out: Path) -> dict:
    from toolchain.report import write_report
    from toolchain.reportdata import collect

    data = collect(ctx, inputs)
    write_report(data, out)
    return {"files": sorted(p.name for p in out.iterdir())}


# -- plan -----------------------------------------------------------------------------------------

def plan(recipe: Recipe) -> list[Stage]:
    """All stages of a recipe, in execution order."""
    m = recipe.model
    source_fp = m.source
    from toolchain.models import resolve_source

    try:
        src = resolve_source(m.source, recipe.base_dir, m.gguf_file)
        source_fp = {"kind": src.kind, "id": src.hub_id, "revision": m.revision,
                     "fingerprint": fingerprint_path(src.path) if src.path else None}
    except EdgesmithError:
        pass  # reported when the model stage runs
    model_stage = Stage("model", "model", [], {"model": asdict(m), "source": source_fp}, run_model,
                        f"load {m.source} and save it as a safetensors checkpoint")
    stages = [model_stage]
    merged = "model"
    if recipe.data is not None:
        d = recipe.data
        fps = {"path": fingerprint_path(recipe.resolve(d.path))}
        if d.eval_path:
            fps["eval_path"] = fingerprint_path(recipe.resolve(d.eval_path))
        # data first: a bad dataset is reported before minutes of model loading
        stages = [
            Stage("data", "data", [], {"data": asdict(d), "files": fps}, run_data, f"read and split {d.path}"),
            model_stage,
            Stage("train", "train", ["model", "data"], {"train": asdict(recipe.train), "data": asdict(d)}, run_train,
                  f"{recipe.train.method} fine-tune"),
            Stage("merge", "merge", ["model", "train"], asdict(recipe.merge), run_merge, "merge the adapter"),
            Stage("eval", "eval", ["model", "merge", "data"], asdict(recipe.eval), run_eval,
                  f"{recipe.eval.metric} before/after fine-tuning"),
        ]
        merged = "merge"
    ref_inputs = [merged] + (["data"] if recipe.data is not None else [])
    from toolchain import prompts
    stages.append(Stage("reference", "reference", ref_inputs,
                        {"bench": asdict(recipe.bench), "texts": [prompts.QUALITY_TEXT, prompts.GREEDY_PROMPTS,
                                                                  prompts.BENCH_PROMPT]},
                        _with_merge_alias(run_reference, merged), "reference logits and greedy outputs"))
    from toolchain.registry import EXPORTERS

    def target_cfg(t):
        cls = EXPORTERS.get(t.format).config_class()
        return cls(**t.options) if cls else None

    cfgs = [target_cfg(t) for t in recipe.targets]
    if any(getattr(c, "needs_calibration", False) or getattr(c, "needs_imatrix", False) for c in cfgs):
        stages.append(Stage("calibrate", "calibrate", ["model"] + (["data"] if recipe.data is not None else []),
                            asdict(recipe.calibrate), run_calibrate, "calibration sample for quantisers"))
    if any(getattr(c, "needs_imatrix", False) for c in cfgs):
        stages.append(Stage("imatrix", "imatrix", [merged, "calibrate"], {"method": "llama-imatrix sum of x^2"},
                            _with_merge_alias(run_imatrix, merged), "importance matrix on the calibration sample"))
    bench_cfg = asdict(recipe.bench)
    if recipe.bench.reference:
        stages.append(Stage("bench-torch", "bench", [merged, "reference"], {"bench": bench_cfg, "runtime": "torch"},
                            make_bench("torch", "merged", merged), "benchmark the merged model on torch"))
    for t in recipe.targets:
        eid = f"export-{t.name}"
        cfg = target_cfg(t)
        needs = [merged]
        if getattr(cfg, "needs_calibration", False):
            needs.append("calibrate")
        if getattr(cfg, "needs_imatrix", False):
            needs.append("imatrix")
        if getattr(cfg, "needs_adapter", False):
            needs += [i for i in ("model", "train") if i not in needs]
        if "reference" in EXPORTERS.get(t.format).needs:  # checks its files on the reference's quality ids
            needs.append("reference")
        stages.append(Stage(eid, "export", needs, {"format": t.format, "options": t.options},
                            _with_merge_alias(make_export(t), merged), f"export {t.format} {t.options or ''}".strip()))
        for rt in t.bench_runtimes:
            stages.append(Stage(f"bench-{t.name}-{rt}", "bench", [eid, "reference"],
                                {"bench": bench_cfg, "runtime": rt}, make_bench(rt, t.name, eid),
                                f"benchmark {t.name} on {rt}"))
    stages.append(Stage("report", "report", [s.id for s in stages], {"title": recipe.report.title}, run_report,
                        "write report.json / .md / .html"))
    return stages


def _with_merge_alias(fn: Callable, merged: str) -> Callable:
    """Stages after the merge read `inputs['merge']`; without training that is the base model."""
    def wrapped(ctx, inputs, out):
        if "merge" not in inputs:
            inputs = dict(inputs, merge=inputs[merged])
        return fn(ctx, inputs, out)
    return wrapped
