"""QLoRA: the recipe's contradictions are named with their fix; the 4-bit base keeps its embedding, LM
head (tied) and norms full precision; the merge builds both float32 candidates, writes the one into the
dequantised weights (which reproduces the model as trained, checked here independently of the manifest),
records both figure sets, keeps the embeddings tied, and stops the stage when its gate fails."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import build_tiny_llama, build_tokenizer, have, spread_weights
from tests.tolerances import MERGED_VS_ADAPTER, QLORA_DEQUANTIZED_MERGE, QLORA_ORIGINAL_MERGE_EFFECT
from toolchain.cli import main

pytestmark = pytest.mark.skipif(not have("bitsandbytes"), reason="pip install 'edgesmith[qlora]'")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def spread_tied_dir(tmp_path_factory, dates_rows) -> Path:
    """A tiny tied Llama with unit-scale weights: the 4-bit rounding of its weights moves its outputs."""
    out = tmp_path_factory.mktemp("spread-tied")
    tok = build_tokenizer(out, [m["content"] for r in dates_rows for m in r["messages"]])
    build_tiny_llama(out, tok, tie=True)
    spread_weights(out)
    return out


def recipe(tmp: Path, model_dir: Path, train: dict | None = None, merge: dict | None = None) -> Path:
    doc = {
        "name": "t", "output_dir": str(tmp / "runs"), "model": {"source": str(model_dir)},
        "data": {"path": str(REPO / "examples/data/dates.jsonl"), "eval_size": 8, "max_rows": 40, "max_length": 64},
        "train": {"method": "qlora", "lora": {"rank": 4, "alpha": 8}, "learning_rate": 1e-2, "batch_size": 8,
                  "max_steps": 4, "eval_every": "no", "threads": 1, "logging_steps": 1, **(train or {})},
    }
    if merge:
        doc["merge"] = merge
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def run_dir(tmp: Path) -> Path:
    return tmp / "runs" / "t"


def figures(tmp: Path, stage: str) -> dict:
    return json.loads((run_dir(tmp) / stage / "manifest.json").read_text())["figures"]


# --- the recipe ------------------------------------------------------------------------------------

def test_qlora_with_hft_is_refused(tmp_path, tiny_model_dir):
    from toolchain.core.errors import RecipeError
    from toolchain.pipeline.recipe import load_recipe

    with pytest.raises(RecipeError) as info:
        load_recipe(recipe(tmp_path, tiny_model_dir, {"method": "hft", "qlora": {"quant_type": "nf4"}}))
    problem = next(p for p in info.value.problems if p.where.endswith("train.qlora"))
    assert "train.method is hft" in problem.rule and "train.method: qlora" in problem.fix


def test_qlora_with_gguf_lora_is_refused(tmp_path, tiny_model_dir):
    """llama.cpp would apply the adapter over the original weights, not the 4-bit ones it was trained on."""
    from toolchain.core.errors import RecipeError
    from toolchain.pipeline.recipe import load_recipe

    path = recipe(tmp_path, tiny_model_dir)
    doc = yaml.safe_load(path.read_text())
    doc["targets"] = [{"name": "adapter", "format": "gguf-lora"}]
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    problem = next(p for p in info.value.problems if p.where.endswith("targets[0].format"))
    assert "original weights" in problem.rule and problem.value == "gguf-lora" and "qlora_into" in problem.fix


def test_qlora_without_bitsandbytes_names_the_extra(tmp_path, tiny_model_dir, monkeypatch):
    from toolchain.core.errors import RecipeError
    from toolchain.pipeline import registry
    from toolchain.pipeline.recipe import load_recipe

    real = registry.importlib.util.find_spec
    monkeypatch.setattr(registry.importlib.util, "find_spec", lambda m, *a: None if m == "bitsandbytes" else real(m, *a))
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe(tmp_path, tiny_model_dir))
    problem = next(p for p in info.value.problems if p.where.endswith("train.method"))
    assert "bitsandbytes" in problem.rule and problem.fix == "pip install 'edgesmith[qlora]'"


# --- the 4-bit base --------------------------------------------------------------------------------

def test_4bit_base_keeps_embedding_head_and_norms_full_precision(spread_tied_dir):
    from toolchain.training.qlora import footprint, load_4bit, quantized_modules, settings

    quant = settings(None, cuda=False)
    assert quant == {"quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}
    assert settings(None, cuda=True)["compute_dtype"] == "bfloat16"
    model = load_4bit(spread_tied_dir, quant)
    names = quantized_modules(model)
    assert len(names) == 2 * 7 and all(n.split(".")[-1].endswith("_proj") for n in names)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert head.weight.dtype == emb.weight.dtype == torch.float32
    assert head.weight.data_ptr() == emb.weight.data_ptr()  # still one tensor
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "norm" in n)
    fp = footprint(model)
    assert fp["base_memory_bytes"] < fp["base_memory_fp32_bytes"]


def test_eval_mode_4bit_forward_computes_as_training_does(spread_tied_dir):
    """On an AVX512-BF16 CPU bitsandbytes' eval-mode, no-grad forward takes a bfloat16 fused kernel unless
    load_4bit keeps it on the training path; either way the output must be x @ dequant(W4).T."""
    import bitsandbytes.functional as bnbf

    from toolchain.training.qlora import load_4bit, settings

    model = load_4bit(spread_tied_dir, settings(None, cuda=False)).eval()
    linear = model.get_submodule("model.layers.0.mlp.down_proj")
    w = bnbf.dequantize_4bit(linear.weight.data, linear.weight.quant_state).float()
    x = torch.randn(1, 7, linear.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = linear(x)
    torch.testing.assert_close(got, x @ w.T, rtol=QLORA_DEQUANTIZED_MERGE.rtol, atol=0.0)


# --- train + merge ---------------------------------------------------------------------------------

def as_trained_logits(base_dir: Path, adapter_dir: Path, ids: list[int]) -> torch.Tensor:
    """The model as trained, rebuilt here: the 4-bit base + the unmerged adapter, float32 compute."""
    from peft import PeftModel

    from toolchain.training.qlora import load_4bit, trained_settings

    model = PeftModel.from_pretrained(load_4bit(base_dir, trained_settings(adapter_dir, None), "float32"), adapter_dir)
    with torch.inference_mode():
        return model.eval()(input_ids=torch.tensor([ids])).logits[0]


def test_qlora_trains_and_the_dequantized_merge_reproduces_it(tmp_path, spread_tied_dir):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert main(["merge", str(recipe(tmp_path, spread_tied_dir, {"lora": {"rank": 4, "alpha": 8, "dora": True}})),
                 "--quiet"]) == 0
    train = figures(tmp_path, "train")
    assert train["method"] == "qlora" and train["quant_type"] == "nf4" and train["double_quant"] is True
    assert train["dora"] is True and train["quantized_modules"] == 14
    assert train["base_memory_bytes"] < train["base_memory_fp32_bytes"]
    assert train["final_loss"] < train["first_loss"]

    q = figures(tmp_path, "merge")["qlora_merge"]
    assert q["chosen"] == "dequantized" and set(q["candidates"]) == {"dequantized", "original"}
    deq, orig = q["candidates"]["dequantized"], q["candidates"]["original"]
    assert deq["kl_mean"] < QLORA_DEQUANTIZED_MERGE.kl and deq["top1_agreement"] >= QLORA_DEQUANTIZED_MERGE.top1
    assert deq["gate"]["passed"] and deq["gate"]["gate"] == "QLORA_MERGE"
    assert orig["kl_mean"] > QLORA_ORIGINAL_MERGE_EFFECT.lo  # the original weights are not what was trained
    assert "dequant(quant(W))" in q["other_differs_because"]

    # independently of the manifest: the written model's logits are the as-trained model's
    out = run_dir(tmp_path) / "merge"
    ids = AutoTokenizer.from_pretrained(out)("Write 5 March 2021 as YYYY-MM-DD.")["input_ids"]
    ref = as_trained_logits(spread_tied_dir, run_dir(tmp_path) / "train", ids)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.inference_mode():
        got = merged(input_ids=torch.tensor([ids])).logits[0]
    assert (got - ref).abs().max().item() <= QLORA_DEQUANTIZED_MERGE.rtol * ref.abs().max().item()
    # plain float32 weights, embeddings still tied, no adapter or 4-bit leftovers
    assert merged.get_output_embeddings().weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()
    with safe_open(str(out / "model.safetensors"), "pt") as st:
        keys = list(st.keys())
    assert "lm_head.weight" not in keys and not any("lora_" in k or "absmax" in k or "quant" in k for k in keys)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_qlora_merge_into_the_original_weights(tmp_path, tiny_model_dir):
    """merge.qlora_into: original writes W + the adapter's delta: the plain LoRA merge of the same adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert main(["merge", str(recipe(tmp_path, tiny_model_dir, merge={"qlora_into": "original"})), "--quiet"]) == 0
    q = figures(tmp_path, "merge")["qlora_merge"]
    assert q["chosen"] == "original" and q["candidates"]["original"]["gate"]["gate"] == "QLORA_MERGE_ORIGINAL"
    assert q["candidates"]["original"]["kl_mean"] > q["candidates"]["dequantized"]["kl_mean"]
    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                     run_dir(tmp_path) / "train").eval()
    merged = AutoModelForCausalLM.from_pretrained(run_dir(tmp_path) / "merge", dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.inference_mode():
        diff = (merged(input_ids=ids).logits - lora(input_ids=ids).logits).abs().max().item()
    assert diff < MERGED_VS_ADAPTER.atol


def test_a_failed_merge_gate_stops_the_stage_and_writes_nothing(tmp_path, tiny_model_dir, monkeypatch):
    from toolchain.quality import gates

    strict = gates.Gate(-1.0, 1.0, 0.0, 0.0, "impossible: KL below zero")
    monkeypatch.setitem(gates.TIERS, "QLORA_MERGE", strict)
    assert main(["merge", str(recipe(tmp_path, tiny_model_dir)), "--quiet"]) == 4
    assert not (run_dir(tmp_path) / "merge").exists()
    log = (run_dir(tmp_path) / "logs" / "merge.log").read_text()
    assert "merge.qlora_into: dequantized" in log and "QLORA_MERGE" in log and "KL" in log
