"""The prune stage in the pipeline (toolchain/stages/prune.py) on a tiny random Llama.

setup: the tiny GQA Llama (2 layers, 4 query heads in 2 groups, MLP 128), a recipe that trains it,
prunes it (one layer, MLP to 64, one GQA group), heals it by distillation and exports ONNX fp32;
assert: the model every later stage reads is the pruned one (a standard checkpoint whose config
matches its tensors), the ONNX export passes its gate against the *pruned* model's reference, the
prune manifest and report carry the figures; sparse masks survive the healing merge; bad cuts are
recipe errors naming the key, raised before training.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from toolchain.cli import main

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not __import__("importlib").util.find_spec("onnxruntime"), reason="needs onnxruntime")


def write_recipe(tmp: Path, model_dir: Path, prune: dict, targets=None) -> Path:
    recipe = {
        "name": "p", "output_dir": str(tmp / "runs"), "model": {"source": str(model_dir)},
        "data": {"path": str(REPO / "examples/data/dates.jsonl"), "format": "chat", "eval_size": 8, "max_rows": 40,
                 "max_length": 64, "packing": True},
        "train": {"lora": {"rank": 4, "alpha": 8}, "learning_rate": 1e-2, "max_steps": 2, "batch_size": 8,
                  "eval_every": "no", "threads": 1},
        "calibrate": {"samples": 4, "max_tokens": 32},
        "prune": prune,
        "eval": {"max_examples": 2, "max_new_tokens": 4},
        "targets": targets if targets is not None else [{"name": "onnx-fp32", "format": "onnx",
                                                          "options": {"precision": "fp32"}}],
        "bench": {"prompt_tokens": 16, "gen_tokens": 4, "repetitions": 1, "warmup": 0, "quality_tokens": 32,
                  "greedy_prompts": 1, "greedy_tokens": 4},
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def manifest(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "manifest.json").read_text())


def test_structured_prune_heal_and_export(tmp_path, tiny_model_dir):
    from transformers import AutoConfig

    prune = {"score": "wanda", "layers": {"drop": 1}, "mlp": {"keep": 64}, "heads": {"keep": 2},
             "heal": {"steps": 3, "batch_size": 4, "learning_rate": 1e-3, "rank": 4, "generated": 3,
                      "generated_tokens": 8}}
    path = write_recipe(tmp_path, tiny_model_dir, prune)
    assert main(["run", str(path), "--quiet"]) == 0
    run_dir = tmp_path / "runs" / "p"

    config = AutoConfig.from_pretrained(run_dir / "prune")
    assert (config.num_hidden_layers, config.intermediate_size, config.num_attention_heads,
            config.num_key_value_heads) == (1, 64, 2, 1)
    figures = manifest(run_dir, "prune")["figures"]
    assert figures["size_bytes"]["pruned"] < figures["size_bytes"]["dense"]
    assert len(figures["structured"]["calibration"]["angular_distance"]) == 2
    assert len(figures["structured"]["dropped_layers"]) == 1
    assert set(figures["models"]) == {"dense", "pruned", "healed"}
    assert figures["models"]["dense"]["delta_ppl"] == 0.0 and figures["models"]["dense"]["kl_mean"] == 0.0
    assert figures["models"]["pruned"]["kl_mean"] > 0
    assert figures["heal"]["train"]["steps"] == 3 and figures["heal"]["train"]["method"] == "distill+lora"
    assert figures["heal"]["generated"]["texts"] == 3  # the dense model's own writing, distilled on too
    assert (run_dir / "prune" / "importance.png").exists() and not (run_dir / "prune" / "_work").exists()

    # every later stage reads the pruned model: the reference and the export are of it, and the gate passes
    for stage in ("eval", "reference", "export-onnx-fp32"):
        assert "prune" in manifest(run_dir, stage)["inputs"] and "merge" not in manifest(run_dir, stage)["inputs"]
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert report["pruning"]["models"]["healed"]["ppl"] > 0
    rows = [r for r in report["bench"] if r.get("target") == "onnx-fp32"]
    assert rows and all(r["gate"]["passed"] for r in rows)
    assert [r["runtime"] for r in report["bench"] if r.get("target") == "pruned"] == ["torch"]  # the reference row
    assert "Pruning" in (run_dir / "report" / "report.md").read_text()


def test_sparse_masks_survive_the_healing_merge(tmp_path, tiny_model_dir):
    import torch
    from safetensors.torch import load_file

    prune = {"score": "magnitude", "sparse": {"pattern": "2:4"},
             "heal": {"steps": 2, "batch_size": 4, "learning_rate": 1e-2, "rank": 4}}
    path = write_recipe(tmp_path, tiny_model_dir, prune)
    assert main(["run", str(path), "--quiet"]) == 0  # the ONNX export reads the masked checkpoint as it is
    run_dir = tmp_path / "runs" / "p"
    assert [p.name for p in (run_dir / "prune").glob("*.safetensors")] == ["model.safetensors"]
    assert (run_dir / "prune" / "sparsity" / "masks.safetensors").exists()
    figures = manifest(run_dir, "prune")["figures"]
    assert figures["sparsity"]["overall"] == pytest.approx(0.5)
    weights = load_file(run_dir / "prune" / "model.safetensors")
    w = weights["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal((w.reshape(w.shape[0], -1, 4) != 0).sum(-1), torch.full((w.shape[0], w.shape[1] // 4), 2))


def test_prune_compare_measures_every_variant_and_reports_them(tmp_path, tiny_model_dir, capsys):
    prune = {"score": "wanda", "layers": {"drop": 1}, "mlp": {"keep": 64},
             "heal": {"steps": 1, "batch_size": 4, "learning_rate": 1e-3, "rank": 4, "generated": 0}}
    path = write_recipe(tmp_path, tiny_model_dir, prune)
    assert main(["prune-compare", str(path), "--quiet", "--variants", "dense,structured,unstructured-50",
                 "--rounds", "2"]) == 0
    run_dir = tmp_path / "runs" / "p"
    doc = json.loads((run_dir / "prune-variants.json").read_text())
    assert list(doc["variants"]) == ["dense", "structured", "unstructured-50"] and doc["meta"]["targets"] == ["onnx-fp32"]
    size = {v: doc["variants"][v]["targets"]["onnx-fp32"]["size_bytes"] for v in doc["variants"]}
    assert size["structured"] < 0.8 * size["dense"]  # one of two layers and half the MLP gone
    assert abs(size["unstructured-50"] / size["dense"] - 1) < 0.01  # the zeros are stored densely
    for v in doc["variants"].values():
        run = v["targets"]["onnx-fp32"]["runs"][0]
        assert run["runtime"] == "onnxruntime" and run["decode_tps"] > 0 and run["gate_passed"] is True
    models = doc["variants"]["unstructured-50"]["pruning"]["models"]
    assert set(models) == {"dense", "pruned", "healed"} and doc["variants"]["dense"]["pruning"] == {}
    # the recipe's own run (structured) is what the run folder holds, its report carries the comparison
    assert manifest(run_dir, "prune")["figures"]["structured"]["dropped_layers"]
    md = (run_dir / "report" / "report.md").read_text()
    assert "edgesmith prune-compare" in md and "| unstructured-50 | onnx-fp32 |" in md and "Decode vs dense" in md
    assert "no target edgesmith ships runs unstructured" in md.lower()
    assert "prune_variants.png" in md and (run_dir / "report" / "prune_variants.png").stat().st_size > 1000


def test_prune_compare_names_a_bad_variant(tmp_path, tiny_model_dir, capsys):
    path = write_recipe(tmp_path, tiny_model_dir, {"layers": {"drop": 1}})
    assert main(["prune-compare", str(path), "--quiet", "--variants", "dense,3:4"]) == 2
    err = capsys.readouterr().err
    assert "--variants" in err and "'3:4'" in err and "unstructured-NN" in err
    assert not (tmp_path / "runs").exists()  # checked before anything ran


def test_openings_are_the_first_words_of_each_sentence():
    from toolchain.training.distill import openings

    assert openings(["One two three four five. Six seven eight nine ten!\nTen eleven", "One two three four more."]) == \
        ["One two three four", "Six seven eight nine"]


@pytest.mark.parametrize("prune, key", [
    ({}, "prune.layers"),
    ({"layers": {"drop": 1, "fraction": 0.5}}, "prune.layers.drop"),
    ({"sparse": {"fraction": 0.5, "pattern": "2:4"}}, "prune.sparse.fraction"),
    ({"mlp": {"keep": 64, "multiple": 48}}, "prune.mlp.multiple"),
])
def test_bad_prune_sections_are_recipe_errors(tmp_path, tiny_model_dir, prune, key, capsys):
    path = write_recipe(tmp_path, tiny_model_dir, prune)
    assert main(["run", str(path), "--quiet"]) == 2
    assert key in capsys.readouterr().err


@pytest.mark.parametrize("prune, key", [
    ({"layers": {"drop": 2}}, "prune.layers.drop"),          # no layer left of 2
    ({"heads": {"keep": 3}}, "prune.heads.keep"),            # 3 query heads split a GQA group of 2
    ({"mlp": {"keep": 16}}, "prune.mlp.keep"),               # below the multiple of 32
])
def test_cuts_the_model_cannot_take_fail_before_training(tmp_path, tiny_model_dir, prune, key, capsys):
    path = write_recipe(tmp_path, tiny_model_dir, prune)
    assert main(["run", str(path), "--quiet"]) == 2
    assert key in capsys.readouterr().err
    assert not (tmp_path / "runs" / "p" / "train").exists()


def test_gguf_lora_with_prune_is_refused(tmp_path, tiny_model_dir, capsys):
    path = write_recipe(tmp_path, tiny_model_dir, {"layers": {"drop": 1}},
                        targets=[{"name": "adapter", "format": "gguf-lora"}])
    assert main(["run", str(path), "--quiet"]) == 2
    assert "prune section" in capsys.readouterr().err
