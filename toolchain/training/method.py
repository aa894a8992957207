"""What a fine-tuning method decides, and the shared Trainer harness does not.

A method (``lora``, ``qlora``, ``hft``: one module each plus one row of
``toolchain.pipeline.registry.METHODS``) answers these questions: how the base model is loaded for
training, what wraps it for training (a PEFT config by default; half fine-tuning freezes parameters
instead), which callbacks it adds to the Trainer, what it changes in the TrainingArguments, what it
saves, and how its result is merged into a full-precision model; and it names itself in the train
manifest. Everything else (tokenisation, batching, the Trainer, checkpoints, resume, early stopping,
the loss history and plot) is ``toolchain.training.trainer``'s, shared by every method.
"""
from __future__ import annotations

from pathlib import Path


class TrainingMethod:
    name = "?"
    summary = ""
    # True for a method that changes which parameters train during the run (hft redraws its half each
    # round): the harness then builds the optimizer over every parameter, frozen ones included (a frozen
    # parameter has no gradient, so AdamW neither updates nor decays it)
    optimizer_holds_frozen = False

    def load_base(self, base_dir: Path, tcfg):
        """The base model to train on (full precision by default)."""
        import torch
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)

    def adapter_config(self, tcfg):
        """The PEFT config wrapped around the base model."""
        raise NotImplementedError

    def wrap(self, model, tcfg):
        """The model the Trainer trains: the base wrapped in the method's PEFT adapter by default."""
        from peft import get_peft_model

        return get_peft_model(model, self.adapter_config(tcfg))

    def callbacks(self, model, tcfg) -> list:
        """TrainerCallbacks the method needs (none by default)."""
        return []

    def save(self, model, out_dir: Path) -> None:
        """Write the training result to ``out_dir`` (the PEFT adapter by default)."""
        model.save_pretrained(out_dir)

    def training_arguments(self, tcfg) -> dict:
        """Overrides of the TrainingArguments the harness builds (none by default)."""
        return {}

    def loss(self, model, inputs: dict, num_items=None):
        """(loss, outputs) of one batch: cross-entropy on the labelled positions (``training/loss.py``);
        distillation (``training/distill.py``) replaces it with a KL to a teacher's logits."""
        from toolchain.training.loss import selected_loss

        return selected_loss(model, inputs, num_items)

    def figures(self, tcfg) -> dict:
        """What the train manifest records about the method (its name and settings)."""
        return {"method": self.name}

    def merge(self, base_dir: Path, adapter_dir: Path, out_dir: Path, recipe, data_dir: Path | None = None) -> dict:
        """The adapter merged into a full-precision copy of the base (``toolchain.training.merge``).

        ``recipe`` gives the merge settings (``recipe.merge``) and the data settings; ``data_dir`` is the
        data stage's output (train.jsonl, eval.jsonl) for methods that measure their merge."""
        from toolchain.training.merge import merge

        return merge(base_dir, adapter_dir, out_dir, recipe.merge.dtype)


def method_for(name: str) -> TrainingMethod:
    """The registered method called ``name`` (``train.method`` in the recipe)."""
    from toolchain.pipeline.registry import METHODS

    return METHODS.get(name).load()
