"""What a fine-tuning method decides, and the shared Trainer harness does not.

A method (``lora`` today; QLoRA, DoRA, half fine-tuning plug in as one module each plus one row of
``toolchain.pipeline.registry.METHODS``) answers four questions: how the base model is loaded for
training, which PEFT config wraps it, what it changes in the TrainingArguments, and how its adapter
is merged into a full-precision model; and it names itself in the train manifest. Everything else
(tokenisation, the Trainer, checkpoints, resume, early stopping, the loss history and plot) is
``toolchain.training.trainer``'s, shared by every method.
"""
from __future__ import annotations

from pathlib import Path


class TrainingMethod:
    name = "?"
    summary = ""

    def load_base(self, base_dir: Path, tcfg):
        """The base model to train on (full precision by default)."""
        import torch
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)

    def adapter_config(self, tcfg):
        """The PEFT config wrapped around the base model."""
        raise NotImplementedError

    def training_arguments(self, tcfg) -> dict:
        """Overrides of the TrainingArguments the harness builds (none by default)."""
        return {}

    def figures(self, tcfg) -> dict:
        """What the train manifest records about the method (its name and settings)."""
        return {"method": self.name}

    def merge(self, base_dir: Path, adapter_dir: Path, out_dir: Path, dtype: str) -> dict:
        """The adapter merged into a full-precision copy of the base (``toolchain.training.merge``)."""
        from toolchain.training.merge import merge

        return merge(base_dir, adapter_dir, out_dir, dtype)


def method_for(name: str) -> TrainingMethod:
    """The registered method called ``name`` (``train.method`` in the recipe)."""
    from toolchain.pipeline.registry import METHODS

    return METHODS.get(name).load()
