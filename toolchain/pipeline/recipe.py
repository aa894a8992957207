"""The recipe: one YAML file describing a whole run, validated completely before any work.

Sections mirror the stages (model, data, train, merge, eval, targets, bench, report). Every
field has a type, a default where one makes sense, and a rule; unknown keys are errors.
Later stages (prune, calibrate, DPO, ...) add a section here and a stage module.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolchain.core.errors import NO_VALUE, Problem, RecipeError, one_line
from toolchain.pipeline.registry import EXPORTERS, METHODS, RUNTIMES, STAGES
from toolchain.pipeline.schema import (
    Located,
    load_yaml_with_lines,
    opt,
    validate_section,
)

EMBEDDED_MODEL = "smollm2-135m-instruct"


@dataclass
class ModelSection:
    source: str = opt(EMBEDDED_MODEL, help="embedded name, HF model directory, .gguf file, or hub id")
    gguf_file: str | None = opt(None, help="GGUF file name when `source` is a directory holding several")
    revision: str | None = opt(None, help="hub revision (hub ids only)")
    trust_remote_code: bool = opt(False, help="run model code shipped with the checkpoint (off unless set)")
    dtype: str = opt("float32", choices=("float32", "bfloat16", "float16"), help="dtype for training and merging")


@dataclass
class DataSection:
    path: str = opt(help="JSONL, CSV, Parquet file or datasets.save_to_disk directory (relative to the recipe)")
    format: str = opt("auto", choices=("auto", "chat", "instruction", "prompt_completion", "text"),
                      help="row format; auto detects it from the columns")
    eval_path: str | None = opt(None, help="separate eval file; otherwise eval rows are split off")
    eval_size: float = opt(0.1, min=0, help="eval split: a fraction (<1) or a row count (>=1)")
    seed: int = opt(0, help="shuffle seed for the split")
    max_length: int = opt(512, min=8, help="tokens per example; longer ones are truncated")
    max_rows: int | None = opt(None, min=1, help="use only the first N rows (after shuffling)")
    packing: bool = opt(False, help="padding-free packing: each batch's examples in one row, position ids restarting "
                        "per example, attention computed per example (1.8x the real tokens/s of dynamic padding "
                        "on the CPU: benchmarks/results/train_speed.md)")
    train_on_prompt: bool = opt(False, help="compute the loss on prompt tokens too")
    bad_rows: str = opt("error", choices=("error", "skip"), help="error: stop naming file and line; skip: skip and count")
    system_prompt: str | None = opt(None, help="system message added to chat rows that have none")


@dataclass
class LoraSection:
    rank: int = opt(16, min=1, help="LoRA rank r")
    alpha: float = opt(32.0, min=0, help="LoRA alpha (scale = alpha / rank)")
    dropout: float = opt(0.0, min=0, max=1, help="dropout on the LoRA input")
    target_modules: list[str] = opt(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"],
                                    help="module names to adapt (or [all-linear])")
    dora: bool = opt(False, help="DoRA: learn a magnitude per output row beside the low-rank direction (peft use_dora)")
    rslora: bool = opt(False, help="rank-stabilised LoRA: scale alpha / sqrt(rank) instead of alpha / rank")


@dataclass
class QloraSection:
    quant_type: str = opt("nf4", choices=("nf4", "fp4"), help="4-bit data type of the frozen base (bitsandbytes)")
    double_quant: bool = opt(True, help="quantise the 4-bit blocks' scales too (saves ~0.4 bit per weight)")
    compute_dtype: str = opt("auto", choices=("auto", "float32", "bfloat16"),
                             help="dtype the 4-bit weights are dequantised to per matmul (auto: float32 on CPU, bfloat16 on CUDA)")


@dataclass
class HftSection:
    fraction: float = opt(0.5, min=0.01, max=1, help="share of the parameter matrices of each layer trained in a round")
    rounds: int = opt(4, min=1, help="how many times over the run the trained half is redrawn")
    seed: int = opt(0, help="seed of the draws")


@dataclass
class TrainSection:
    method: str = opt("lora", help="fine-tuning method: a name in the method table (toolchain.pipeline.registry.METHODS)")
    lora: LoraSection = opt(default_factory=LoraSection, help="LoRA settings (lora and qlora)")
    qlora: QloraSection | None = opt(None, help="the 4-bit base of train.method qlora (defaults when omitted)")
    hft: HftSection | None = opt(None, help="half fine-tuning settings of train.method hft (defaults when omitted)")
    learning_rate: float = opt(2e-4, min=0, help="peak learning rate")
    lr_scheduler: str = opt("cosine", choices=("linear", "cosine", "constant", "constant_with_warmup"),
                            help="learning-rate schedule")
    warmup_ratio: float = opt(0.0, min=0, max=1, help="fraction of steps used to warm up")
    weight_decay: float = opt(0.0, min=0, help="AdamW weight decay")
    epochs: float = opt(1.0, min=0, help="passes over the training split")
    max_steps: int = opt(-1, help="stop after this many optimiser steps (-1: use epochs)")
    batch_size: int = opt(8, min=1, help="examples per device batch")
    grad_accum: int = opt(1, min=1, help="gradient accumulation steps")
    seed: int = opt(0, help="training seed")
    eval_every: str = opt("epoch", choices=("epoch", "steps", "no"), help="when to evaluate on the eval split")
    eval_steps: int = opt(50, min=1, help="evaluate every N steps when eval_every is steps")
    early_stopping_patience: int | None = opt(None, min=1, help="stop after N evals without improvement")
    save_checkpoints: bool = opt(True, help="keep checkpoints so --resume can continue")
    logging_steps: int = opt(5, min=1, help="log the loss every N steps")
    threads: int | None = opt(None, min=1, help="torch threads (default: all cores)")
    group_by_length: bool = opt(False, help="batch examples of similar length together (less padding; "
                                "examples are drawn from shuffled groups, not fully at random)")
    fsdp: str | None = opt(None, help="FSDP config (JSON, the Trainer's fsdp_config; relative to the recipe): shard "
                           "training over the ranks of torchrun / accelerate launch")
    deepspeed: str | None = opt(None, help="DeepSpeed config (JSON, relative to the recipe) for training under "
                                "torchrun / accelerate launch (needs the deepspeed package)")

    def check(self):
        if self.method not in METHODS:
            close = difflib.get_close_matches(str(self.method), METHODS.names(), n=1)
            yield ("method", f"must be one of {', '.join(METHODS.names())}", self.method,
                   f"did you mean `{close[0]}`?" if close else f"set it to one of: {', '.join(METHODS.names())}")
        elif METHODS.get(self.method).missing():
            entry = METHODS.get(self.method)
            yield ("method", f"{self.method} needs {', '.join(entry.missing())}, which is not installed", self.method,
                   entry.install_hint())
        if self.qlora is not None and self.method != "qlora":
            yield ("qlora", f"configures the 4-bit base of method qlora, but train.method is {self.method}",
                   "qlora: {...}", "set train.method: qlora, or remove train.qlora"
                   + (" (half fine-tuning trains full-precision weights; it cannot train a 4-bit base)"
                      if self.method == "hft" else ""))
        if self.hft is not None and self.method != "hft":
            yield ("hft", f"configures method hft, but train.method is {self.method}", "hft: {...}",
                   "set train.method: hft, or remove train.hft")
        if self.method == "hft" and (self.lora.dora or self.lora.rslora):
            yield ("lora.dora" if self.lora.dora else "lora.rslora", "is a LoRA option; half fine-tuning trains no adapter",
                   True, "remove it, or set train.method: lora")
        if self.max_steps == 0 or self.max_steps < -1:
            yield "max_steps", "must be -1 (use epochs) or a positive integer", self.max_steps, "set -1 or N > 0"
        if self.max_steps == -1 and self.epochs <= 0:
            yield "epochs", "must be positive when max_steps is -1", self.epochs, "set epochs > 0 or max_steps"
        if self.early_stopping_patience and self.eval_every == "no":
            yield "early_stopping_patience", "needs evaluation", self.early_stopping_patience, "set eval_every to epoch or steps"
        if self.fsdp and self.deepspeed:
            yield "deepspeed", "cannot be combined with train.fsdp (two ways of sharding)", self.deepspeed, \
                "keep one of train.fsdp and train.deepspeed"
        elif self.deepspeed and importlib.util.find_spec("deepspeed") is None:
            yield "deepspeed", "needs the deepspeed package, which is not installed", self.deepspeed, "pip install deepspeed"


@dataclass
class MergeSection:
    dtype: str = opt("float32", choices=("float32", "bfloat16", "float16"), help="dtype of the merged checkpoint")
    qlora_into: str = opt("dequantized", choices=("dequantized", "original"),
                          help="QLoRA: merge into the dequantised 4-bit weights the adapter was trained against, "
                               "or into the original full-precision weights (both are measured)")


@dataclass
class EvalSection:
    metric: str = opt("exact_match", choices=("exact_match", "contains"), help="task metric on the eval split")
    max_examples: int = opt(64, min=1, help="eval rows scored by generation")
    max_new_tokens: int = opt(32, min=1, help="generation budget per eval row")
    batch_size: int = opt(16, min=1, help="eval rows generated together")
    before: bool = opt(True, help="also score the base model (the 'before' figure)")


@dataclass
class TargetSection:
    name: str = opt(help="unique target name, e.g. onnx-fp32")
    format: str = opt(help="exporter name (see `edgesmith targets`)")
    runtimes: list[str] | None = opt(None, help="runtimes that benchmark it (default per format)")
    options: dict[str, Any] = opt(default_factory=dict, help="exporter options, e.g. {precision: fp32}")

    def check(self):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name or ""):
            yield "name", "must be letters, digits, '.', '_' or '-'", self.name, "e.g. onnx-fp32"
        if self.format not in EXPORTERS:
            yield "format", f"must be a registered exporter ({', '.join(EXPORTERS.names())})", self.format, "run `edgesmith targets`"
            return
        for i, rt in enumerate(self.runtimes or []):
            if rt not in RUNTIMES:
                yield f"runtimes[{i}]", f"must be a registered runtime ({', '.join(RUNTIMES.names())})", rt, "run `edgesmith targets`"
        entry = EXPORTERS.get(self.format)
        missing = entry.missing_modules()
        if missing:  # the options class imports nothing heavy, so this is where a missing extra shows
            yield "format", f"needs {', '.join(missing)}, which is not installed", self.format, entry.install_hint()
            return
        for rt in self.bench_runtimes:
            rt_missing = RUNTIMES.get(rt).missing_modules() if rt in RUNTIMES else []
            if rt_missing:
                where = f"runtimes[{self.runtimes.index(rt)}]" if self.runtimes else "format"
                yield (where, f"is benchmarked on {rt}, which needs {', '.join(rt_missing)} (not installed)", rt,
                       f"{RUNTIMES.get(rt).install_hint()}, or set `runtimes` without {rt}")
        cfg_cls = entry.config_class()
        if cfg_cls is not None:
            try:
                cfg_cls(**self.options)
            except (TypeError, ValueError) as exc:
                yield "options", str(exc), NO_VALUE, f"see `edgesmith targets` and the {self.format} exporter's options"

    @property
    def bench_runtimes(self) -> list[str]:
        if self.runtimes is not None:
            return self.runtimes
        return list(EXPORTERS.get(self.format).runtimes) if self.format in EXPORTERS else []


@dataclass
class BenchSection:
    reference: bool = opt(True, help="benchmark the merged model on torch as the reference row")
    threads: int = opt(2, min=1, help="threads every runtime uses")
    prompt_tokens: int = opt(128, min=1, help="prompt length for prefill timing")
    gen_tokens: int = opt(64, min=2, help="tokens decoded per repetition")
    repetitions: int = opt(3, min=1, help="timed repetitions (mean and spread reported)")
    warmup: int = opt(1, min=0, help="untimed warm-up runs")
    quality_tokens: int = opt(256, min=16, help="held-out tokens scored for KL / top-1 / perplexity")
    greedy_prompts: int = opt(4, min=1, help="fixed prompts whose greedy output must match")
    greedy_tokens: int = opt(32, min=1, help="greedy tokens generated per fixed prompt")


@dataclass
class CalibrateSection:
    samples: int = opt(64, min=1, help="calibration sequences shared by every quantiser that needs them")
    max_tokens: int = opt(256, min=8, help="tokens per calibration sequence")
    seed: int = opt(0, help="which training rows are sampled")


@dataclass
class ReportSection:
    title: str | None = opt(None, help="report title (default: the run name)")


@dataclass
class Recipe:
    name: str = opt(help="run name; outputs go to <output_dir>/<name>")
    model: ModelSection = opt(default_factory=ModelSection, help="base model")
    data: DataSection | None = opt(None, help="dataset (omit to skip training)")
    train: TrainSection = opt(default_factory=TrainSection, help="fine-tuning")
    merge: MergeSection = opt(default_factory=MergeSection, help="adapter merge")
    eval: EvalSection = opt(default_factory=EvalSection, help="task metric before/after")
    targets: list[TargetSection] = opt(default_factory=list, help="export targets")
    calibrate: CalibrateSection = opt(default_factory=CalibrateSection,
                                      help="calibration sample (imatrix, static int8)")
    bench: BenchSection = opt(default_factory=BenchSection, help="benchmark settings")
    report: ReportSection = opt(default_factory=ReportSection, help="report settings")
    output_dir: str = opt("runs", help="where runs are written (relative to the current directory)")

    # set by load_recipe, not recipe keys (init=False keeps them out of validation and describe)
    recipe_path: Path | None = dataclasses.field(default=None, init=False, repr=False, compare=False)
    # the folder a relative output_dir is relative to: the working directory when the recipe was loaded
    work_dir: Path | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def check(self):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name or ""):
            yield "name", "must be letters, digits, '.', '_' or '-'", self.name, "e.g. quickstart"
        seen: dict[str, int] = {}
        for i, t in enumerate(self.targets or []):
            if t is None:
                continue
            if t.name in seen:
                yield f"targets[{i}].name", f"repeats targets[{seen[t.name]}].name", t.name, "give each target a unique name"
            seen[t.name] = i
            if t.format in EXPORTERS and "adapter" in EXPORTERS.get(t.format).needs:
                if self.data is None:
                    yield (f"targets[{i}].format", f"{t.format} exports the fine-tuned adapter, which needs a `data` section",
                           t.format, "add data: {path: ...} or remove this target")
                elif self.train.method not in ("lora", "qlora"):
                    yield (f"targets[{i}].format", f"{t.format} exports a LoRA adapter; train.method {self.train.method} "
                           "trains none", t.format, "use a merged-model format (gguf, onnx, ...) or train.method: lora")
                elif self.train.method == "qlora":
                    yield (f"targets[{i}].format", f"{t.format} applies the adapter over the original weights, not the "
                           "4-bit weights a QLoRA adapter was trained against (measured on SmolLM2: KL 1.01, top-1 0.71 "
                           "against the model as trained)", t.format,
                           "use the merged model (format gguf, merge.qlora_into: dequantized), or train.method: lora")
                elif getattr(self, "prune", None) is not None:
                    yield (f"targets[{i}].format", f"{t.format} exports the adapter of the dense model; the prune "
                           "section changes the model later stages use", t.format,
                           "use a merged-model format (gguf, onnx, ...), or remove the prune section")
                elif self.train.lora.dora:
                    yield (f"targets[{i}].format", f"{t.format} cannot carry a DoRA adapter (llama.cpp applies only "
                           "A and B, not DoRA's magnitudes)", t.format,
                           "use the merged model (format gguf), or set train.lora.dora: false")

    @property
    def base_dir(self) -> Path:
        return self.recipe_path.parent if self.recipe_path else Path.cwd()

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)

    def run_dir(self) -> Path:
        """``<output_dir>/<name>``, absolute: every stage, subprocess and browser gets a path that does not
        depend on its own working directory."""
        out = Path(self.output_dir).expanduser()
        if not out.is_absolute():
            out = (self.work_dir or Path.cwd()) / out
        return Path(os.path.abspath(out / self.name))

    def section_dict(self, name: str) -> dict:
        value = getattr(self, name)
        if isinstance(value, list):
            return {"items": [dataclasses.asdict(v) for v in value]}
        return dataclasses.asdict(value) if value is not None else {}


def with_stage_sections(base: type, entries) -> type:
    """``base`` with one optional section per stage-table row that brings its own (``section_class``): a
    plug-in stage's settings are validated, described and reported like every built-in section's."""
    fields = {f.name for f in dataclasses.fields(base)}
    extra = []
    for e in entries:
        if getattr(e, "section_class", None) and e.section not in fields:
            module, _, attr = e.section_class.partition(":")
            cls = getattr(__import__(module, fromlist=[attr]), attr)
            extra.append((e.section, cls | None, opt(None, help=f"{e.summary} (omit to skip the {e.name} stage)")))
    if not extra:
        return base
    return dataclasses.make_dataclass(base.__name__, extra, bases=(base,), namespace={"__module__": base.__module__})


Recipe = with_stage_sections(Recipe, STAGES)


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Load and validate a recipe; raise RecipeError listing every problem at once."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError("cannot read the recipe", [Problem(str(path), "must be an existing YAML file", str(path),
                                                            "check the path, e.g. examples/quickstart.yaml")])
    try:
        data, lines = load_yaml_with_lines(path)
    except Exception as exc:  # a yaml.MarkedYAMLError carries the line/column of the problem
        raise RecipeError("the recipe is not valid YAML", [_yaml_problem(path, exc)]) from None
    if not isinstance(data, dict):
        raise RecipeError("the recipe is not a mapping", [Problem(str(path), "must be a YAML mapping of sections", data,
                                                                 "start from examples/quickstart.yaml")])
    problems: list[Problem] = []
    for dotted, value in (overrides or {}).items():
        problem = _set_dotted(data, dotted, value)
        if problem is not None:
            problems.append(problem)
    if problems:
        raise RecipeError("cannot apply the --set overrides", problems)
    loc = Located(str(path), lines, overridden=set(overrides or {}))
    recipe = validate_section(data, Recipe, "", loc, problems)
    if recipe is not None:
        recipe.recipe_path = path.resolve()
        recipe.work_dir = Path.cwd()
        if recipe.data is not None:
            for key in ("path", "eval_path"):
                value = getattr(recipe.data, key)
                if isinstance(value, str) and not recipe.resolve(value).exists():
                    problems.append(Problem(loc.where(f"data.{key}"), "must name an existing file or directory", value,
                                            f"paths are relative to the recipe's folder ({recipe.base_dir})"))
        problems += _launch_config_files(recipe, loc)
    if problems or recipe is None:
        raise RecipeError(f"{path} is not a valid recipe", problems)
    return recipe


def _launch_config_files(recipe, loc: Located) -> list[Problem]:
    """train.fsdp / train.deepspeed must name a JSON file; made absolute here (the Trainer reads it from any folder)."""
    import json

    problems = []
    for key in ("fsdp", "deepspeed"):
        value = getattr(recipe.train, key, None)
        if not isinstance(value, str):
            continue
        path = recipe.resolve(value)
        rule = None
        if not path.is_file():
            rule, fix = "must name an existing JSON file", f"paths are relative to the recipe's folder ({recipe.base_dir})"
        else:
            try:
                json.loads(path.read_text())
            except (ValueError, UnicodeDecodeError) as exc:
                rule, fix = f"must be a JSON file ({one_line(exc)})", "fix the file's JSON syntax"
        if rule:
            problems.append(Problem(loc.where(f"train.{key}"), rule, value, fix))
        else:
            setattr(recipe.train, key, os.path.abspath(path))
    return problems


def _yaml_problem(path: Path, exc: Exception) -> Problem:
    """Name the file, line and column of a YAML syntax error and what the parser expected."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    parts = [getattr(exc, "context", None), getattr(exc, "problem", None)]
    what = ": ".join(p for p in parts if p) or (str(exc).splitlines() or [type(exc).__name__])[0]
    fix = "fix the YAML syntax at that line and column" if mark is not None else "fix the YAML syntax"
    return Problem(where, "must parse as YAML", what, fix)


def _set_dotted(data: dict, dotted: str, value: Any) -> Problem | None:
    """Set ``a.b.c`` in ``data``, creating missing sections; a Problem if a parent is not a mapping."""
    parts = dotted.split(".")
    if not all(parts):
        return Problem(f"--set {dotted}", "must be a dotted key like train.max_steps", NO_VALUE,
                       "write KEY=VALUE with a key such as train.lora.rank")
    cur = data
    for i, p in enumerate(parts[:-1]):
        if cur.get(p) is None:
            cur[p] = {}
        cur = cur[p]
        if not isinstance(cur, dict):
            parent = ".".join(parts[:i + 1])
            return Problem(f"--set {dotted}", f"needs `{parent}` to be a section (a mapping)", cur,
                           f"set a key that exists, e.g. --set {parent}=VALUE")
    cur[parts[-1]] = value
    return None
