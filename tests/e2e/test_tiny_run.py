"""End to end on a tiny random model: the real CLI, every stage, the cache, the report.

setup: a tiny Llama + tokenizer written at test time and a recipe pointing at it;
execute: `edgesmith run` twice and once with a changed stage config;
assert: every artifact and report file exists, manifests are complete, ONNX greedy output
matches torch, and the cache reruns exactly the stages after the change.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from toolchain.cli import main

pytestmark = pytest.mark.skipif(not __import__("importlib").util.find_spec("onnxruntime"), reason="needs onnxruntime")


def write_recipe(tmp: Path, model_dir: Path, **train_overrides) -> Path:
    recipe = {
        "name": "tiny", "output_dir": str(tmp / "runs"),
        "model": {"source": str(model_dir)},
        "data": {"path": str(Path(__file__).resolve().parents[2] / "examples/data/dates.jsonl"), "format": "chat",
                 "eval_size": 8, "max_rows": 40, "max_length": 64},
        "train": {"lora": {"rank": 4, "alpha": 8}, "learning_rate": 1e-2, "epochs": 1, "batch_size": 8,
                  "logging_steps": 1, **train_overrides},
        "eval": {"max_examples": 4, "max_new_tokens": 8},
        "targets": [{"name": "onnx-fp32", "format": "onnx", "options": {"precision": "fp32"}}],
        "bench": {"prompt_tokens": 32, "gen_tokens": 8, "repetitions": 2, "warmup": 1, "quality_tokens": 64,
                  "greedy_prompts": 2, "greedy_tokens": 8},
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def statuses(run_dir: Path) -> dict[str, str]:
    return {s["stage"]: s["status"] for s in json.loads((run_dir / "run.json").read_text())["stages"]}


def test_tiny_run_end_to_end(tmp_path, tiny_model_dir, capsys):
    recipe = write_recipe(tmp_path, tiny_model_dir)
    run_dir = tmp_path / "runs" / "tiny"

    assert main(["run", str(recipe), "--quiet"]) == 0
    first = statuses(run_dir)
    assert set(first.values()) == {"run"}
    for name in ("model", "data", "train", "merge", "eval", "reference", "export-onnx-fp32",
                 "bench-torch", "bench-onnx-fp32-onnxruntime", "report"):
        manifest = json.loads((run_dir / name / "manifest.json").read_text())
        assert manifest["stage_id"] == name and manifest["files"], name
        assert all(len(f["sha256"]) == 64 for f in manifest["files"])
        assert "torch" in manifest["versions"]
    assert (run_dir / "train" / "adapter_config.json").exists()
    assert (run_dir / "train" / "adapter_model.safetensors").exists()
    assert (run_dir / "merge" / "model.safetensors").exists()
    assert (run_dir / "export-onnx-fp32" / "model.onnx").exists()
    for f in ("report.html", "report.md", "report.json"):
        assert (run_dir / f).exists()
    report = json.loads((run_dir / "report.json").read_text())
    rows = {r["runtime"]: r for r in report["bench"]}
    assert set(rows) == {"torch", "onnxruntime"}
    assert rows["onnxruntime"]["quality"]["greedy_match"] == 1.0
    assert rows["onnxruntime"]["quality"]["top1_agreement"] == 1.0
    assert rows["onnxruntime"]["decode_tps"]["n"] == 2

    # an unchanged recipe recomputes nothing
    assert main(["run", str(recipe), "--quiet"]) == 0
    assert set(statuses(run_dir).values()) == {"cached"}

    # a changed train config reruns train and everything after it, not model or data
    recipe = write_recipe(tmp_path, tiny_model_dir, learning_rate=5e-3)
    assert main(["run", str(recipe), "--quiet"]) == 0
    third = statuses(run_dir)
    assert third["model"] == third["data"] == "cached"
    assert all(third[s] == "run" for s in ("train", "merge", "eval", "export-onnx-fp32", "report"))


def test_dry_run_prints_plan_and_runs_nothing(tmp_path, tiny_model_dir, capsys):
    recipe = write_recipe(tmp_path, tiny_model_dir)
    assert main(["run", str(recipe), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "RUN" in out and "export-onnx-fp32" in out
    assert not (tmp_path / "runs" / "tiny").exists()


def test_target_preflight_fails_before_training(tmp_path, tiny_model_dir, capsys):
    # a GPT-2 model is not an architecture the GGUF exporter supports: the run must stop right
    # after the model loads with the exporter's message, before minutes of training
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    gpt2_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(tok), n_positions=128)).save_pretrained(gpt2_dir)
    tok.save_pretrained(gpt2_dir)
    recipe = write_recipe(tmp_path, gpt2_dir)
    doc = yaml.safe_load(recipe.read_text())
    doc["targets"] = [{"name": "gguf-f16", "format": "gguf", "options": {"quant": "F16"}}]
    recipe.write_text(yaml.safe_dump(doc))

    assert main(["run", str(recipe), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "'gpt2'" in err and "GGUF exporter supports" in err
    run_dir = tmp_path / "runs" / "tiny"
    assert (run_dir / "model").exists() and not (run_dir / "train").exists()
