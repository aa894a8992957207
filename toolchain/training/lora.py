"""``train.method: lora``: a LoRA adapter (peft) on the full-precision base, merged in float32."""
from __future__ import annotations

from toolchain.training.method import TrainingMethod


class Lora(TrainingMethod):
    name = "lora"
    summary = "LoRA adapters on the full-precision base (peft), merged in float32"

    def adapter_config(self, tcfg):
        from peft import LoraConfig

        targets = tcfg.lora.target_modules
        return LoraConfig(r=tcfg.lora.rank, lora_alpha=tcfg.lora.alpha, lora_dropout=tcfg.lora.dropout,
                          target_modules="all-linear" if targets == ["all-linear"] else targets,
                          bias="none", task_type="CAUSAL_LM")

    def figures(self, tcfg) -> dict:
        return {"method": self.name, "rank": tcfg.lora.rank, "alpha": tcfg.lora.alpha,
                "target_modules": tcfg.lora.target_modules}


METHOD = Lora()
