"""`edgesmith init NAME --data FILE`: a commented starter recipe for the user's own data.

The data file is read the way the data stage reads it (every bad row reported with file and line);
the recipe gets the detected row format, an eval split and a max_length sized to the rows, the
quickstart's training settings and its targets (QUICKSTART_TARGETS; a test keeps them equal to
examples/quickstart.yaml), and it is validated by the recipe loader before it is written.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from toolchain.core.errors import NO_VALUE, EdgesmithError, Problem, RecipeError
from toolchain.core.files import atomic_path

# (name, format, options, runtimes or None for the format's defaults, comment): the quickstart's targets
QUICKSTART_TARGETS = [
    ("onnx-fp32", "onnx", {"precision": "fp32"}, None,
     "fused onnxruntime graph + genai_config.json (onnxruntime-genai / mobile apps)"),
    ("onnx-fp16", "onnx", {"precision": "fp16"}, None, "fp16 weights, activations and KV cache"),
    ("onnx-int8", "onnx", {"precision": "int8"}, None, "int8 weights, activations quantised at run time"),
    ("onnx-int4", "onnx", {"precision": "int4", "block_size": 32, "symmetric": False, "accuracy_level": 4,
                           "imatrix": True, "quantize_embedding": True}, ["onnxruntime", "onnxruntime-genai"],
     "MatMulNBits block 32, scales searched with the importance matrix, int8 LM head"),
    ("gguf-q4_0", "gguf", {"quant": "Q4_0"}, None, "llama.cpp's plain 4-bit: the speed anchor"),
    ("gguf-f16", "gguf", {"quant": "F16"}, None, "llama.cpp, 16-bit"),
    ("gguf-q8_0", "gguf", {"quant": "Q8_0"}, None, "llama.cpp, 8-bit"),
    ("gguf-q4_k_m", "gguf", {"quant": "Q4_K_M"}, None, "llama.cpp's usual 4-bit k-quant"),
    ("gguf-q4_k_m-imatrix", "gguf", {"quant": "Q4_K_M", "imatrix": True}, None,
     "the same with an importance matrix: the report shows what it buys"),
    ("gguf-iq4_xs-imatrix", "gguf", {"quant": "IQ4_XS", "imatrix": True}, None, "4-bit non-linear grid"),
    ("gguf-lora", "gguf-lora", {"base_type": "F16"}, None, "base F16 GGUF + the adapter applied at load time"),
    ("web", "webgpu", {"webgpu": ["q4f16", "q4"], "wasm": ["q8"], "symmetric": False, "imatrix": True},
     ["browser-wasm", "onnxruntime"], "browser bundle: WebGPU q4f16/q4, wasm q8 (add browser-webgpu on a GPU)"),
    ("web-q4", "webgpu", {"webgpu": ["q4"], "wasm": ["q4"], "symmetric": False, "imatrix": True},
     ["onnxruntime"], "the q4 file WebGPU loads without shader-f16, checked natively"),
    ("web-fp32", "webgpu", {"webgpu": ["fp32"], "wasm": ["fp32"]}, ["browser-wasm", "onnxruntime"],
     "fp32 files: the fastest dtype on wasm, 4x the download"),
    ("webllm", "webllm", {"quants": ["q4f16_1", "q4f32_1", "q0f16", "q0f32"], "libraries": ["q0f32"]},
     ["browser-webllm"], "WebLLM bundle: MLC weights in four quantisations, a q0f32 model library"),
]

CHARS_PER_TOKEN = 3.0  # a conservative guess for English with a BPE vocabulary (the true count is the model's)
TEMPLATE_TOKENS = 64  # what a chat template adds around the rows (SmolLM2's adds a default system prompt)


def add_init_parser(sub) -> None:
    p = sub.add_parser("init", help="write a starter recipe for your data",
                       description="Write a commented starter recipe NAME.yaml for your data: the row format "
                       "detected from the file, an eval split, the quickstart's training settings and targets.")
    p.add_argument("name", help="run name (letters, digits, '.', '_', '-'); the recipe is NAME.yaml")
    p.add_argument("--data", required=True, metavar="FILE", help="your dataset (.jsonl, .json, .csv, .parquet)")
    p.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", default=None, metavar="PATH", help="where to write the recipe (default: ./NAME.yaml)")
    p.add_argument("--force", action="store_true", help="overwrite an existing recipe file")


def survey(path: Path) -> dict:
    """Rows, detected format and lengths of a data file; raises DataError naming every bad row."""
    from toolchain.stages import data as data_mod

    result = data_mod.load_file(path, "auto", None)
    if result.problems:
        raise data_mod.bad_rows_error([result])
    if not result.examples:
        raise RecipeError("cannot write a recipe", [Problem(str(path), "has no rows", NO_VALUE,
                                                            "give a file with at least a few dozen examples")])
    lengths = [len(json.dumps(ex, ensure_ascii=False)) for ex in result.examples]
    answers = []
    for ex in result.examples:
        replies = [m["content"] for m in ex.get("messages", []) if m["role"] == "assistant"]
        if replies:
            answers.append(len(replies[-1]))
    answers.sort()
    return {"rows": len(result.examples), "format": result.fmt, "max_chars": max(lengths),
            "median_answer_chars": answers[len(answers) // 2] if answers else None}


def suggest(s: dict) -> dict:
    """Split, lengths and metric for a data survey."""
    rows = s["rows"]
    eval_rows = max(4, min(200, rows // 10))
    tokens = s["max_chars"] / CHARS_PER_TOKEN + TEMPLATE_TOKENS
    max_length = min(2048, max(128, -(-int(tokens) // 64) * 64))
    short = s["median_answer_chars"] is not None and s["median_answer_chars"] <= 40
    return {"eval_size": eval_rows, "max_length": max_length, "metric": "exact_match" if short else "contains",
            "max_new_tokens": 32 if short else 128}


def render(name: str, data_rel: str, s: dict, model: str | None) -> str:
    g = suggest(s)
    model_line = (f"  source: {json.dumps(model)}" if model else
                  "  source: smollm2-135m-instruct        # the embedded default (edgesmith setup model)")
    if s["format"] == "text":
        metric_note = "# text rows have no answers to score: the report gives eval loss; chat rows get a task metric"
    elif g["metric"] == "exact_match":
        metric_note = f"# answers are short (median {s['median_answer_chars']} characters): the reply must equal them"
    else:
        metric_note = (f"# answers are long (median {s['median_answer_chars']} characters): the reply must contain "
                       f"the reference; exact_match is stricter")
    lines = [
        f"# {name}: a starter recipe written by `edgesmith init` for {data_rel}.",
        "# Check the values marked CHECK, then: edgesmith run --dry-run "
        f"{name}.yaml (the plan), edgesmith run {name}.yaml (everything).",
        "# Every key and its rule: the README's recipe reference; `--set key=value` overrides one for a run.",
        f"name: {name}",
        "model:",
        model_line,
        "data:",
        f"  path: {json.dumps(data_rel)}" + " " * max(1, 30 - len(json.dumps(data_rel)))
        + f"# {s['rows']} rows, relative to this recipe's folder",
        f"  format: {s['format']}" + " " * max(1, 28 - len(s['format'])) + "# detected from the rows",
        f"  eval_size: {g['eval_size']}" + " " * max(1, 25 - len(str(g['eval_size'])))
        + "# held-out rows for eval loss and the task metric (a fraction < 1 also works)",
        "  seed: 0",
        f"  max_length: {g['max_length']}" + " " * max(1, 24 - len(str(g['max_length'])))
        + f"# CHECK: tokens per example; your longest row has {s['max_chars']} characters "
        f"(~{CHARS_PER_TOKEN:g} per token, plus the chat template)",
        "train:",
        "  method: lora",
        "  lora: {rank: 16, alpha: 32, dropout: 0.0}",
        "  learning_rate: 2.0e-3                # CHECK: the quickstart's; lower it (2e-4) for larger datasets",
        "  lr_scheduler: cosine",
        "  warmup_ratio: 0.1",
        "  epochs: 1",
        "  batch_size: 8",
        "  eval_every: epoch",
        "  logging_steps: 2",
        "eval:",
        f"  metric: {g['metric']}" + " " * max(1, 28 - len(g['metric'])) + metric_note,
        f"  max_examples: {min(g['eval_size'], 64)}",
        f"  max_new_tokens: {g['max_new_tokens']}",
        "calibrate:",
        "  samples: 16                          # rows the importance matrix and static int8 are computed on",
        "  max_tokens: 256",
        "# The quickstart's targets: delete the ones you do not ship. `edgesmith targets` lists every format.",
        "targets:",
    ]
    for tname, fmt, options, runtimes, comment in QUICKSTART_TARGETS:
        lines.append(f"  - name: {tname}" + " " * max(1, 29 - len(tname)) + f"# {comment}")
        lines.append(f"    format: {fmt}")
        lines.append(f"    options: {_flow(options)}")
        if runtimes is not None:
            lines.append(f"    runtimes: [{', '.join(runtimes)}]")
    lines += [
        "bench:",
        "  threads: 2                           # CHECK: the cores your users' devices give the model",
        "  prompt_tokens: 128",
        "  gen_tokens: 32",
        "  repetitions: 3",
        "  warmup: 1",
        "",
    ]
    return "\n".join(lines)


def _flow(value) -> str:
    """A YAML flow mapping/list of plain scalars, as the quickstart writes its options."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def run_init(args) -> int:
    import re

    from toolchain.pipeline.recipe import load_recipe

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", args.name):
        raise RecipeError("cannot write a recipe", [Problem("NAME", "must be letters, digits, '.', '_' or '-'",
                                                            args.name, "e.g. edgesmith init support-bot --data ...")])
    data = Path(args.data).expanduser()
    out = Path(args.out).expanduser() if args.out else Path(f"{args.name}.yaml")
    if not data.is_file():
        raise RecipeError("cannot write a recipe", [Problem(f"--data {args.data}", "must be an existing data file",
                                                            args.data, "give the path of your .jsonl/.csv/.parquet")])
    if out.exists() and not args.force:
        raise EdgesmithError(f"{out} exists; nothing was written (fix: pick another NAME or --out, or add --force)")
    s = survey(data)
    rel = os.path.relpath(data.resolve(), out.resolve().parent)
    data_rel = rel if not rel.startswith(os.pardir + os.sep + os.pardir) else str(data.resolve())
    text = render(args.name, data_rel, s, args.model)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text(text)
        load_recipe(tmp)  # the recipe it writes must be one the loader accepts; else nothing is written
    print(f"wrote {out}: {s['rows']} {s['format']} rows in {data}, {suggest(s)['eval_size']} held out for eval")
    print(f"next: edgesmith run {out} --dry-run   (the plan), then edgesmith run {out}")
    return 0
