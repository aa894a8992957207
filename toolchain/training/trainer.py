"""The shared fine-tuning harness: peft + the transformers Trainer, for every training method.

The Trainer is used (rather than a hand-written loop) so accelerate's launchers, checkpoints and
resume work as users of Axolotl/TRL expect. The output is a standard PEFT adapter directory
(adapter_config.json + adapter_model.safetensors + tokenizer) plus the loss history and curve.
What differs between methods (how the base is loaded, the PEFT config, TrainingArguments overrides,
the recorded name) comes from the method (``toolchain.training.method``). CUDA is used when present.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

from toolchain.core import dist
from toolchain.core.chat import tokenize_example
from toolchain.core.errors import StageError
from toolchain.pipeline.recipe import DataSection, TrainSection
from toolchain.training.batching import collator_for, real_tokens
from toolchain.training.packed_attention import use_packed_attention
from toolchain.training.method import TrainingMethod


def tokenize_all(examples: list[dict], tokenizer, dcfg: DataSection) -> tuple[list[dict], int]:
    """Tokenize examples; returns (tokenized, dropped) where dropped had no label left."""
    out, dropped = [], 0
    for ex in examples:
        tok = tokenize_example(ex, tokenizer, dcfg.max_length, dcfg.train_on_prompt)
        if tok is None or all(label == -100 for label in tok["labels"]):
            dropped += 1
            continue
        out.append(tok)
    return out, dropped  # data.packing packs each batch's examples in the collator (training/batching.py)


def train(base_dir: Path, train_examples: list[dict], eval_examples: list[dict], tcfg: TrainSection,
          dcfg: DataSection, out_dir: Path, method: TrainingMethod, resume: bool = False,
          progress: bool = True) -> dict:
    """Train ``method``'s adapter on the base model in ``base_dir``; write it to ``out_dir``."""
    import torch
    from transformers import AutoTokenizer, EarlyStoppingCallback, TrainingArguments

    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_tok, dropped_train = tokenize_all(train_examples, tokenizer, dcfg)
    eval_tok, dropped_eval = tokenize_all(eval_examples, tokenizer, dcfg)
    if not train_tok:
        raise StageError("no training example has any token left to learn from after tokenisation "
                         f"(max_length {dcfg.max_length}); raise data.max_length or check the data")

    from transformers import set_seed

    set_seed(tcfg.seed)  # train.seed also fixes the adapter's initial weights (drawn in method.wrap)
    base = method.load_base(base_dir, tcfg)
    # packed rows: attention cut per example instead of a block-diagonal mask (training/packed_attention.py)
    packed_attention = bool(dcfg.packing) and use_packed_attention(base)
    model = method.wrap(base, tcfg)
    if hasattr(model, "get_nb_trainable_parameters"):  # peft counts a 4-bit base's packed weights right
        trainable, total = model.get_nb_trainable_parameters()
    else:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())

    ckpt_dir = Path(out_dir) / "checkpoints"
    do_eval = tcfg.eval_every != "no" and bool(eval_tok)
    strategy = tcfg.eval_every if do_eval else "no"
    # checkpoints follow the eval schedule (early stopping needs them aligned); without eval, each epoch
    save_strategy = ("epoch" if strategy == "no" else strategy) if tcfg.save_checkpoints else "no"
    overrides = method.training_arguments(tcfg)
    args = TrainingArguments(**{**dict(
        output_dir=str(ckpt_dir), per_device_train_batch_size=tcfg.batch_size,
        per_device_eval_batch_size=tcfg.batch_size, gradient_accumulation_steps=tcfg.grad_accum,
        learning_rate=tcfg.learning_rate, lr_scheduler_type=tcfg.lr_scheduler,
        warmup_steps=tcfg.warmup_ratio, weight_decay=tcfg.weight_decay,
        num_train_epochs=tcfg.epochs, max_steps=tcfg.max_steps, seed=tcfg.seed, data_seed=tcfg.seed,
        logging_steps=tcfg.logging_steps, logging_first_step=True,
        eval_strategy=strategy, eval_steps=tcfg.eval_steps if strategy == "steps" else None,
        save_strategy=save_strategy, save_steps=tcfg.eval_steps,
        save_total_limit=2, load_best_model_at_end=bool(tcfg.early_stopping_patience and do_eval),
        metric_for_best_model="eval_loss", greater_is_better=False,
        report_to="none", **device_arguments(), **launch_arguments(tcfg), dataloader_num_workers=0,
        disable_tqdm=not progress, remove_unused_columns=False,
        train_sampling_strategy="group_by_length" if tcfg.group_by_length else "random",
    ), **overrides})
    callbacks = list(method.callbacks(model, tcfg))
    if tcfg.early_stopping_patience and do_eval:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=tcfg.early_stopping_patience))
    trainer = _counting_trainer_class()(model=model, args=args, train_dataset=ListDataset(train_tok),
                      eval_dataset=ListDataset(eval_tok) if do_eval else None,
                      data_collator=collator_for(dcfg.packing, tokenizer.pad_token_id), callbacks=callbacks)
    trainer.optimizer_holds_frozen = method.optimizer_holds_frozen
    trainer.method = method
    resume_from = _last_checkpoint(ckpt_dir) if resume else None
    if not resume and ckpt_dir.exists() and dist.is_main():
        shutil.rmtree(ckpt_dir)
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    wall = time.perf_counter() - t0

    trainer.tokens = _sum_over_ranks(trainer, trainer.tokens)  # every rank's real tokens (one process: its own)
    history = trainer.state.log_history
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:  # weights sharded over the ranks:
        trainer.save_model(str(out_dir))  # every rank takes part, the Trainer writes on rank 0
    elif dist.is_main():
        method.save(model, Path(out_dir))
    if dist.is_main():  # under a launcher only rank 0 writes (the other ranks' out_dir is rank 0's)
        from toolchain.core.models import save_tokenizer
        save_tokenizer(tokenizer, Path(out_dir))
        (Path(out_dir) / "log_history.json").write_text(json.dumps(history, indent=1))
        from toolchain.report import plots
        png = plots.loss_png(history)
        if png:
            (Path(out_dir) / "loss.png").write_bytes(png)
        if not tcfg.save_checkpoints and ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)

    losses = [h["loss"] for h in history if "loss" in h]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    final_loss = losses[-1] if losses else float("nan")
    if not math.isfinite(final_loss):
        raise StageError(f"training diverged: final loss is {final_loss} (fix: lower train.learning_rate)")
    return {
        **method.figures(tcfg), "learning_rate": tcfg.learning_rate, "device": str(model.device),
        "trainable_parameters": int(trainable), "total_parameters": int(total),
        "train_examples": len(train_examples), "eval_examples": len(eval_examples),
        "dropped_examples": dropped_train + dropped_eval, "train_sequences": len(train_tok),
        "steps": int(trainer.state.global_step), "epochs": float(trainer.state.epoch or 0),
        "train_tokens": trainer.tokens,
        "tokens_per_s": trainer.tokens / trainer.seconds if trainer.seconds else float("nan"),
        "packed_attention": packed_attention,
        "wall_s": wall, "final_loss": final_loss, "eval_loss": evals[-1] if evals else None,
        "first_loss": losses[0] if losses else None, "resumed_from": str(resume_from) if resume_from else None,
        "train_runtime_s": result.metrics.get("train_runtime"), "log_history": history,
        # what the launcher and accelerate made of it: accelerate has FSDP and DeepSpeed on GPUs only (on CPU
        # processes train.fsdp trains with DDP), so the manifest says which ran
        "ranks": dist.world_size(), "parallel": "fsdp" if trainer.is_fsdp_enabled else "deepspeed"
        if trainer.is_deepspeed_enabled else "ddp" if dist.is_distributed() else "none",
    }


def device_arguments() -> dict:
    """CUDA when there is one (the Trainer then places the model there), else the CPU."""
    import torch

    cpu = not torch.cuda.is_available()
    # several CPU processes (torchrun): gloo, named so accelerate does not pick MPI where torch has it
    return {"use_cpu": cpu, **({"ddp_backend": "gloo"} if cpu and dist.is_distributed() else {})}


def launch_arguments(tcfg: TrainSection) -> dict:
    """train.fsdp / train.deepspeed: the config file handed to the Trainer (load_recipe made the path absolute)."""
    if getattr(tcfg, "fsdp", None):
        return {"fsdp": True, "fsdp_config": tcfg.fsdp}
    if getattr(tcfg, "deepspeed", None):
        return {"deepspeed": tcfg.deepspeed}
    return {}


def _sum_over_ranks(trainer, count: int) -> int:
    if not dist.is_distributed():
        return count
    import torch

    return int(trainer.accelerator.reduce(torch.tensor(count, device=trainer.args.device), reduction="sum"))


class ListDataset:
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def _last_checkpoint(ckpt_dir: Path) -> Path | None:
    if not ckpt_dir.is_dir():
        return None
    ckpts = sorted(ckpt_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return ckpts[-1] if ckpts else None


def _counting_trainer_class():
    """A Trainer that counts real (non-pad) training tokens and time spent in training steps."""
    from transformers import Trainer

    class CountingTrainer(Trainer):
        tokens = 0
        seconds = 0.0
        optimizer_holds_frozen = False  # TrainingMethod.optimizer_holds_frozen
        method = TrainingMethod()  # the method whose loss compute_loss takes (set by train())

        def create_optimizer(self, model=None):
            # the Trainer builds its optimizer over the parameters that require grad now; a method that
            # unfreezes others later (hft) needs them in it too
            frozen = [p for p in (self.model if model is None else model).parameters() if not p.requires_grad] \
                if self.optimizer_holds_frozen else []
            for p in frozen:
                p.requires_grad_(True)
            try:
                return super().create_optimizer(model)
            finally:
                for p in frozen:
                    p.requires_grad_(False)

        def training_step(self, model, inputs, *args, **kwargs):
            t = time.perf_counter()
            loss = super().training_step(model, inputs, *args, **kwargs)
            self.seconds += time.perf_counter() - t
            self.tokens += real_tokens(inputs)
            return loss

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # the method's loss: the token-weighted mean over label tokens, logits only where a label is
            # (training/loss.py), or a distillation KL (training/distill.py)
            self.loss_is_scaled_for_ga = num_items_in_batch is not None
            loss, outputs = self.method.loss(model, inputs, num_items_in_batch)
            if num_items_in_batch is not None and self.args.average_tokens_across_devices and self.args.world_size > 1:
                # num_items counts every rank's label tokens and DDP averages gradients over the ranks: scale
                # back up so the gradient is the token mean over the global batch (the Trainer's own compute_loss)
                loss = loss * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

    return CountingTrainer
