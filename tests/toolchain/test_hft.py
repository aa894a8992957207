"""Half fine-tuning (train.method: hft): the paper's selection rule per round, only the drawn half
changes in a round (no update and no weight-decay drift on the frozen half), the half is redrawn at
the round boundaries, the merged model is the trained full model (tied, reloads), and the recipe
refuses what hft cannot do."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from tests.tolerances import HFT_MERGED_RELOAD
from toolchain.cli import main
from toolchain.core.errors import RecipeError
from toolchain.pipeline.recipe import DataSection, HftSection, MergeSection, TrainSection, load_recipe
from toolchain.training import hft
from toolchain.training import trainer as train_mod

REPO = Path(__file__).resolve().parents[2]
STEPS, ROUNDS = 8, 4  # a round every 2 optimiser steps


def load(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def unit_of(name: str, units: set[str]) -> str | None:
    return next((u for u in units if name.startswith(u + ".")), None)


def test_each_round_draws_the_papers_half(tiny_model_dir):
    model = load(tiny_model_dir)
    layers = hft.layer_units(model)
    assert len(layers) == 2
    draws = [hft.draw(model, 0.5, 0, r) for r in range(ROUNDS)]
    for units in draws:
        per_layer = Counter()
        for u in units:
            i = int(u.split("layers.")[1].split(".")[0])
            per_layer[(i, hft.category(u.split(f"layers.{i}.")[1]))] += 1
        assert [per_layer[(i, hft.ATTENTION)] for i in layers] == [2, 2]  # 2 of q, k, v, o in every layer
        assert sorted(per_layer[(i, hft.FFN)] for i in layers) == [1, 2]  # 2 of 3 in half the layers, 1 in the rest
        assert [per_layer[(i, hft.NORM)] for i in layers] == [1, 1]
        figures = hft.apply(model, units)
        outside = [n for n, p in model.named_parameters() if "layers." not in n and p.requires_grad]
        assert outside == []  # embedding (tied LM head) and final norm stay frozen
        assert figures["trainable_parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert len({frozenset(d) for d in draws}) > 1  # redrawn, not one fixed half
    assert hft.draw(model, 0.5, 0, 2) == draws[2] and hft.draw(model, 0.5, 1, 2) != draws[2]  # seeded
    assert hft.draw(model, 1.0, 0, 0) == {u for per in layers.values() for us in per.values() for u in us}


class Probe(hft.HalfFineTuning):
    """hft plus a callback that snapshots the weights and checks the optimiser after every step."""

    def callbacks(self, model, tcfg):
        from transformers import TrainerCallback

        snaps, problems = [], []

        class Snap(TrainerCallback):
            def take(self, state, model, optimizer):
                held = {id(p) for g in optimizer.param_groups for p in g["params"]}
                if held != {id(p) for p in model.parameters()}:
                    problems.append(f"step {state.global_step}: the optimizer does not hold every parameter")
                if any(not p.requires_grad for p in optimizer.state):
                    problems.append(f"step {state.global_step}: optimizer state kept for a frozen parameter")
                snaps.append((state.global_step, {n: p.detach().clone() for n, p in model.named_parameters()}))

            def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
                self.take(state, model, optimizer)

            def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
                self.take(state, model, optimizer)

        self.snaps, self.problems = snaps, problems
        return super().callbacks(model, tcfg) + [Snap()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, dates_rows):
    out = tmp_path_factory.mktemp("hft-train")
    tcfg = TrainSection(method="hft", hft=HftSection(rounds=ROUNDS, seed=3), max_steps=STEPS, learning_rate=1e-2,
                        weight_decay=0.1, lr_scheduler="constant", batch_size=4, eval_every="no",
                        save_checkpoints=False, logging_steps=1, threads=1)
    probe = Probe()
    figures = train_mod.train(tiny_model_dir, dates_rows[:40], dates_rows[40:48], tcfg,
                              DataSection(path="unused", max_length=64), out, probe, progress=False)
    return SimpleNamespace(out=out, probe=probe, figures=figures,
                           rounds=json.loads((out / "hft_rounds.json").read_text()))


def test_only_the_drawn_half_changes_and_is_redrawn_at_round_boundaries(trained):
    assert trained.probe.problems == []
    rounds = trained.rounds
    assert [r["from_step"] for r in rounds] == [0, 2, 4, 6] and [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert len({frozenset(r["units"]) for r in rounds}) > 1
    for r in rounds:  # each round's share is the rule's: 2 + 1.5 + 1 of the 9 units per layer
        assert r["matrices"] == 2 * (2 + 1 + 1) + 1
    snaps = trained.probe.snaps
    assert [s for s, _ in snaps] == list(range(STEPS + 1))
    for (step, before), (_, after) in zip(snaps, snaps[1:]):
        units = set(next(r for r in reversed(rounds) if r["from_step"] <= step)["units"])
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        trained_now = {n for n in before if unit_of(n, units)}
        # weight decay 0.1 at lr 1e-2 would move every frozen weight by 0.1%: frozen must be bit-identical
        assert changed == trained_now, f"step {step + 1}: changed {sorted(changed ^ trained_now)}"
    assert trained.figures["trainable_parameters"] == rounds[0]["trainable_parameters"]
    assert trained.figures["method"] == "hft" and trained.figures["rounds"] == ROUNDS


def test_saves_the_full_model_not_an_adapter(trained):
    assert (trained.out / "model.safetensors").exists() and (trained.out / "tokenizer.json").exists()
    assert not (trained.out / "adapter_config.json").exists()


def test_merged_model_is_the_trained_one_tied_and_reloads(trained, tiny_model_dir, tmp_path):
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        figures = hft.METHOD.merge(tiny_model_dir, trained.out, out, SimpleNamespace(merge=MergeSection(dtype=dtype)))
        merged = load(out)
        assert figures["tied_embeddings"] and merged.config.tie_word_embeddings
        assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
        assert 0 < figures["changed_share"] < 1
        ids = torch.tensor([[1, 5, 9, 17, 33, 65]])
        with torch.inference_mode():
            got = merged(input_ids=ids).logits
            want = load(trained.out).to(getattr(torch, dtype)).float()(input_ids=ids).logits
        assert (got - want).abs().max().item() <= HFT_MERGED_RELOAD.atol
        assert json.loads((out / "config.json").read_text())["rope_theta"] == 100000
        assert (out / "tokenizer_config.json").exists()


def _recipe(tmp_path: Path, model_dir: Path, train: dict, targets: list | None = None) -> Path:
    doc = {"name": "h", "output_dir": str(tmp_path / "runs"), "model": {"source": str(model_dir)},
           "data": {"path": str(REPO / "examples/data/dates.jsonl"), "eval_size": 8, "max_rows": 40, "max_length": 64},
           "train": {"method": "hft", "batch_size": 8, "logging_steps": 1, "eval_every": "no", **train}}
    if targets:
        doc["targets"] = targets
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_recipe_refuses_qlora_settings_and_gguf_lora_with_hft(tmp_path, tiny_model_dir):
    with pytest.raises(RecipeError) as info:
        load_recipe(_recipe(tmp_path, tiny_model_dir, {"qlora": {"quant_type": "nf4"}}))
    assert any(p.where.endswith("train.qlora") for p in info.value.problems), str(info.value)
    assert "half fine-tuning" in str(info.value)
    with pytest.raises(RecipeError) as info:
        load_recipe(_recipe(tmp_path, tiny_model_dir, {}, [{"name": "gl", "format": "gguf-lora"}]))
    assert any(p.where.endswith("targets[0].format") for p in info.value.problems), str(info.value)


def test_cli_trains_and_merges_with_hft(tmp_path, tiny_model_dir):
    path = _recipe(tmp_path, tiny_model_dir, {"max_steps": 4, "learning_rate": 1e-2, "hft": {"rounds": 2},
                                              "save_checkpoints": False, "threads": 1})
    assert main(["merge", str(path), "--quiet"]) == 0
    run = tmp_path / "runs" / "h"
    train = json.loads((run / "train" / "manifest.json").read_text())["figures"]
    assert train["method"] == "hft" and 0 < train["trainable_parameters"] < train["total_parameters"]
    merge = json.loads((run / "merge" / "manifest.json").read_text())["figures"]
    assert merge["tied_embeddings"] and 0 < merge["changed_share"] < 1
