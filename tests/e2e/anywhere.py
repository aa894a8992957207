"""A tiny-model recipe laid out as a user's own folder, outside the checkout, with relative paths.

Shared by test_anywhere.py (the checkout's install) and test_wheel.py (a wheel in a fresh venv):
``user_folder`` writes ``model/`` (a tiny random Llama), ``data/rows.jsonl``, ``recipe.yaml`` with
relative ``model.source``, ``data.path`` and ``output_dir`` and one target of each format the tiny
model supports; ``check_run`` reads what a run left behind.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
BROWSER_RUNTIMES = ("browser-wasm",)

# one target of each format, the smallest of each (runtimes: those the row must have)
TARGETS = [
    {"name": "onnx", "format": "onnx", "options": {"precision": "fp32"}},
    {"name": "gguf", "format": "gguf", "options": {"quant": "F16"}},
    {"name": "gguf-lora", "format": "gguf-lora", "options": {"base_type": "F32"}},
    {"name": "web", "format": "webgpu", "options": {"webgpu": ["fp32"], "wasm": ["fp32"]},
     "runtimes": ["browser-wasm", "onnxruntime"]},
    # the weights, chat config and NumPy reference check; no model library (minutes to compile) and so no
    # browser run: the WebLLM runtime is exercised by tests/runtimes/test_webllm_runtime.py
    {"name": "webllm", "format": "webllm", "options": {"quants": ["q0f32"], "libraries": []}, "runtimes": []},
]
EXPECTED_BENCH = {("merged", "torch"), ("onnx", "onnxruntime"), ("gguf", "llama.cpp"), ("gguf-lora", "llama.cpp"),
                  ("web", "browser-wasm"), ("web", "onnxruntime")}


def user_folder(root: Path, model_dir: Path) -> Path:
    """The folder a user runs `edgesmith run recipe.yaml` in; returns the recipe's path (relative to it)."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(model_dir, root / "model")
    (root / "data").mkdir()
    shutil.copy(REPO / "examples" / "data" / "dates.jsonl", root / "data" / "rows.jsonl")
    recipe = {
        "name": "mine", "output_dir": "runs",  # relative to the folder the run starts in
        "model": {"source": "model"},  # relative to the recipe's folder, as data.path
        "data": {"path": "data/rows.jsonl", "format": "chat", "eval_size": 8, "max_rows": 40, "max_length": 64},
        "train": {"lora": {"rank": 4, "alpha": 8}, "learning_rate": 1e-2, "epochs": 1, "batch_size": 8,
                  "logging_steps": 1},
        "eval": {"max_examples": 4, "max_new_tokens": 8},
        "targets": TARGETS,
        "bench": {"prompt_tokens": 16, "gen_tokens": 4, "repetitions": 1, "warmup": 0, "quality_tokens": 32,
                  "greedy_prompts": 1, "greedy_tokens": 4},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return Path("recipe.yaml")


def check_run(root: Path, proc) -> dict:
    """Assert the run finished with every bench row and its report; returns report.json."""
    out = proc.stdout + proc.stderr
    said = [ln for ln in out.splitlines() if ln.startswith(("gate ", "edgesmith:", "  full log:"))]
    assert proc.returncode == 0, "\n".join(said) + "\n" + proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in out, out[-6000:]
    run = root / "runs" / "mine"
    report = json.loads((run / "report.json").read_text())
    rows = {(r["target"], r["runtime"]) for r in report["bench"]}
    assert rows == EXPECTED_BENCH, rows
    assert (run / "export-webllm" / "app-config.json").is_file()
    for row in report["bench"]:
        assert row["gate"] and row["gate"]["passed"], (row["target"], row["runtime"], row["gate"])
    # every path a stage recorded is inside the user's folder, none in the checkout
    assert str(REPO) not in (run / "run.json").read_text()
    return report
