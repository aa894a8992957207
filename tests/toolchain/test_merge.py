"""Merge: merged logits equal base+adapter logits; the adapter measurably changes the output;
non-finite merged weights stop the merge before anything is written."""
from __future__ import annotations

import pytest
import torch

from tests.tolerances import ADAPTER_EFFECT, MERGED_VS_ADAPTER
from toolchain.core.errors import StageError
from toolchain.training.merge import merge


def make_adapter(model_dir, out, seed=0, poison=False):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
                     task_type="CAUSAL_LM")
    peft_model = get_peft_model(base, cfg)
    if poison:
        with torch.no_grad():
            next(p for n, p in peft_model.named_parameters() if "lora_B" in n).fill_(float("nan"))
    peft_model.save_pretrained(out)
    return peft_model.eval()


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0]


def test_merged_logits_equal_base_plus_adapter(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = tmp_path / "adapter"
    peft_model = make_adapter(tiny_model_dir, adapter)
    out = tmp_path / "merged"
    out.mkdir()
    figures = merge(tiny_model_dir, adapter, out)

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(out)("Write 5 March 2021 as YYYY-MM-DD.")["input_ids"]
    ref = logits(peft_model, ids)
    got = logits(merged, ids)
    assert (got - ref).abs().max().item() < MERGED_VS_ADAPTER.atol
    assert (got - logits(base, ids)).abs().max().item() > ADAPTER_EFFECT.lo
    assert figures["tensors_checked_finite"] > 0
    # the merged directory is a plain HF checkpoint with tokenizer, chat template and generation config
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).exists(), name
    assert AutoTokenizer.from_pretrained(out).chat_template


def test_non_finite_merge_is_refused_before_writing(tmp_path, tiny_model_dir):
    adapter = tmp_path / "adapter"
    make_adapter(tiny_model_dir, adapter, poison=True)
    out = tmp_path / "merged"
    out.mkdir()
    with pytest.raises(StageError, match="not finite"):
        merge(tiny_model_dir, adapter, out)
    assert list(out.iterdir()) == []
