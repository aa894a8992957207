"""``train.method: lora``: a LoRA adapter (peft) on the full-precision base, merged in float32.

``train.lora.dora`` turns on DoRA (peft ``use_dora``: a learned magnitude per output row beside the
low-rank direction), ``train.lora.rslora`` rank-stabilised scaling (``use_rslora``: alpha / sqrt(r)).
Both merge into plain weights (``toolchain.training.merge``, which checks the merged model against the
unmerged one). On a model whose input embedding and LM head share one tensor (SmolLM2), adapting either
would untie them, so such targets are refused before training (``toolchain.training.tied``).
"""
from __future__ import annotations

from pathlib import Path

from toolchain.training.method import TrainingMethod
from toolchain.training.tied import refuse_tied_targets


class Lora(TrainingMethod):
    name = "lora"
    summary = "LoRA adapters on the full-precision base (peft), merged in float32; DoRA and rsLoRA as options"

    def adapter_config(self, tcfg):
        from peft import LoraConfig

        targets = tcfg.lora.target_modules
        return LoraConfig(r=tcfg.lora.rank, lora_alpha=tcfg.lora.alpha, lora_dropout=tcfg.lora.dropout,
                          target_modules="all-linear" if targets == ["all-linear"] else targets,
                          use_dora=bool(tcfg.lora.dora), use_rslora=bool(tcfg.lora.rslora),
                          bias="none", task_type="CAUSAL_LM")

    def wrap(self, model, tcfg):
        refuse_tied_targets(model, tcfg.lora.target_modules)
        return super().wrap(model, tcfg)

    def figures(self, tcfg) -> dict:
        return {"method": self.name, "rank": tcfg.lora.rank, "alpha": tcfg.lora.alpha,
                "target_modules": tcfg.lora.target_modules, "dora": bool(tcfg.lora.dora),
                "rslora": bool(tcfg.lora.rslora)}

    def merge(self, base_dir: Path, adapter_dir: Path, out_dir: Path, recipe, data_dir: Path | None = None) -> dict:
        from toolchain.training.merge import merge

        max_length = recipe.data.max_length if getattr(recipe, "data", None) is not None else 128
        return merge(base_dir, adapter_dir, out_dir, recipe.merge.dtype, data_dir=data_dir, max_length=max_length)


METHOD = Lora()
