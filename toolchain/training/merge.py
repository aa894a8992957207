"""Merge a LoRA adapter into a full-precision copy of the base model.

The merge happens in float32 whatever the recipe's final dtype (merging into a quantised or
half-precision base is the classic source of "gibberish after a QLoRA merge"); every merged
tensor is checked finite before anything is written; the output is a standard HF directory with
the tokenizer, chat template and generation config, readable by transformers 5 and 4.57.
"""
from __future__ import annotations

from pathlib import Path

from toolchain.core.errors import StageError
from toolchain.core.models import patch_config, save_tokenizer


def merge(base_dir: Path, adapter_dir: Path, out_dir: Path, dtype: str = "float32") -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir)
    merged = model.merge_and_unload()
    bad = [name for name, t in merged.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise StageError(f"merged weights are not finite in {len(bad)} tensors ({', '.join(bad[:5])}); "
                         "nothing was written (fix: check the adapter's training loss, lower the learning rate)")
    if dtype != "float32":
        merged = merged.to(getattr(torch, dtype))
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir if (Path(adapter_dir) / "tokenizer.json").exists() else base_dir)
    save_tokenizer(tokenizer, Path(out_dir))
    try:
        GenerationConfig.from_pretrained(base_dir).save_pretrained(out_dir)
    except OSError:
        pass
    cfg = patch_config(Path(out_dir))
    n_params = sum(t.numel() for t in merged.parameters())
    return {"dtype": dtype, "parameters": int(n_params), "architecture": (cfg.get("architectures") or ["?"])[0],
            "tensors_checked_finite": len(merged.state_dict())}
