"""Training: an interrupted run resumes from its last checkpoint through the CLI; early stopping
ends training when the eval loss stops improving; the adapter is a standard PEFT directory."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.tolerances import TRAINING_EVAL_LOSS
from toolchain.cli import main
from toolchain.training import trainer as train_mod

REPO = Path(__file__).resolve().parents[2]
RECORDED_EVAL_LOSSES = [6.02819, 5.87753, 5.85794, 5.85371]  # 8 steps, eval every 2, 1 thread; train.seed seeds the adapter init too


def recipe(tmp: Path, model_dir: Path, **train) -> Path:
    doc = {
        "name": "t", "output_dir": str(tmp / "runs"), "model": {"source": str(model_dir)},
        "data": {"path": str(REPO / "examples/data/dates.jsonl"), "eval_size": 8, "max_rows": 56, "max_length": 64},
        "train": {"lora": {"rank": 4, "alpha": 8}, "learning_rate": 1e-2, "batch_size": 8, "logging_steps": 1,
                  "eval_every": "steps", "eval_steps": 2, **train},
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_interrupted_training_resumes_from_last_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    path = recipe(tmp_path, tiny_model_dir, max_steps=6)
    real = train_mod._counting_trainer_class

    def interrupting():
        base = real()

        class Interrupted(base):
            def training_step(self, model, inputs, *a, **k):
                if self.state.global_step == 5:
                    raise KeyboardInterrupt
                return super().training_step(model, inputs, *a, **k)
        return Interrupted

    monkeypatch.setattr(train_mod, "_counting_trainer_class", interrupting)
    assert main(["train", str(path), "--quiet"]) == 130
    partial = next((tmp_path / "runs" / "t" / "artifacts").glob("train-*.partial"))
    assert (partial / "checkpoints" / "checkpoint-4").is_dir()
    assert not (tmp_path / "runs" / "t" / "train").exists()  # no half artifact looks whole

    monkeypatch.setattr(train_mod, "_counting_trainer_class", real)
    assert main(["train", str(path), "--quiet", "--resume"]) == 0
    manifest = json.loads((tmp_path / "runs" / "t" / "train" / "manifest.json").read_text())
    assert manifest["figures"]["resumed_from"].endswith("checkpoint-4")
    assert manifest["figures"]["steps"] == 6
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "loss.png"):
        assert (tmp_path / "runs" / "t" / "train" / name).exists(), name
    cfg = json.loads((tmp_path / "runs" / "t" / "train" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["peft_type"] == "LORA"


def test_early_stopping_ends_training(tmp_path, tiny_model_dir):
    # 20 epochs of 6 steps at a constant, large learning rate: the eval loss stalls within a few
    # evaluations (every 2 steps), and patience 1 must stop training long before step 120
    path = recipe(tmp_path, tiny_model_dir, epochs=20, learning_rate=0.5, early_stopping_patience=1,
                  lr_scheduler="constant")
    assert main(["train", str(path), "--quiet"]) == 0
    manifest = json.loads((tmp_path / "runs" / "t" / "train" / "manifest.json").read_text())
    history = manifest["figures"]["log_history"]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert manifest["figures"]["steps"] < 20 * 6
    assert evals[-1] >= min(evals[:-1])  # it stopped because the last eval did not improve


def test_training_lowers_the_eval_loss_to_the_recorded_values(tmp_path, tiny_model_dir):
    """torchtune-style: the real CLI trains the tiny model and its eval losses are the ones recorded
    (seeded CPU training), so a change that silently stops learning or changes the loss is caught."""
    path = recipe(tmp_path, tiny_model_dir, max_steps=8, lr_scheduler="constant", threads=1)
    assert main(["train", str(path), "--quiet"]) == 0
    figures = json.loads((tmp_path / "runs" / "t" / "train" / "manifest.json").read_text())["figures"]
    evals = [h["eval_loss"] for h in figures["log_history"] if "eval_loss" in h]
    assert evals == pytest.approx(RECORDED_EVAL_LOSSES, rel=TRAINING_EVAL_LOSS.rtol), evals
    assert evals[-1] < evals[0] - TRAINING_EVAL_LOSS.lo


def test_training_uses_cuda_when_present(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert train_mod.device_arguments() == {"use_cpu": False}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train_mod.device_arguments() == {"use_cpu": True}
