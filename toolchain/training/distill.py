"""Distillation: train a student to match a teacher's next-token distributions (KL on its logits).

Used to heal a pruned model (``toolchain/stages/prune.py``): the student is the pruned model, the
teacher the dense fine-tuned model it was cut from, the texts the fine-tune data, the calibration
text and texts the teacher writes itself (``teacher_texts``: the general text a cut model loses
first). The student trains with an existing method (LoRA adapters, or every matrix: hft with
fraction 1) through the shared harness (``toolchain/training/trainer.py``); only the loss differs:

    loss = T^2 * sum over kept positions of KL(softmax(teacher / T) || softmax(student / T)) / tokens
           (+ ce_weight * the cross-entropy on the labels, when asked)

Kept positions are the ones with a next-token label (``training/loss.py``), so neither model
projects padding or prompt positions onto the vocabulary. The teacher runs under ``no_grad`` in
float32 on the same batch (packed rows attend per example in both models).
"""
from __future__ import annotations

from pathlib import Path

from toolchain.training.method import TrainingMethod


class Distill(TrainingMethod):
    """``inner``'s way of training (what is trainable, what is saved, how it merges) with a KL loss."""

    def __init__(self, inner: TrainingMethod, teacher_dir: Path, temperature: float = 1.0, ce_weight: float = 0.0):
        self.inner = inner
        self.teacher_dir = Path(teacher_dir)
        self.temperature = float(temperature)
        self.ce_weight = float(ce_weight)
        self.name = f"distill+{inner.name}"
        self.summary = f"distillation from {self.teacher_dir.name} ({inner.name})"
        self.optimizer_holds_frozen = inner.optimizer_holds_frozen
        self._teacher = None

    # --- what the inner method decides -----------------------------------------------------------------
    def load_base(self, base_dir, tcfg):
        return self.inner.load_base(base_dir, tcfg)

    def adapter_config(self, tcfg):
        return self.inner.adapter_config(tcfg)

    def wrap(self, model, tcfg):
        return self.inner.wrap(model, tcfg)

    def callbacks(self, model, tcfg):
        return self.inner.callbacks(model, tcfg)

    def save(self, model, out_dir):
        return self.inner.save(model, out_dir)

    def training_arguments(self, tcfg):
        return self.inner.training_arguments(tcfg)

    def merge(self, base_dir, adapter_dir, out_dir, recipe, data_dir=None):
        return self.inner.merge(base_dir, adapter_dir, out_dir, recipe, data_dir)

    def figures(self, tcfg) -> dict:
        return {**self.inner.figures(tcfg), "method": self.name, "teacher": str(self.teacher_dir),
                "temperature": self.temperature, "ce_weight": self.ce_weight}

    # --- the loss --------------------------------------------------------------------------------------
    def teacher(self, device):
        if self._teacher is None:
            import torch
            from transformers import AutoModelForCausalLM

            from toolchain.training.packed_attention import use_packed_attention

            t = AutoModelForCausalLM.from_pretrained(self.teacher_dir, dtype=torch.float32).eval()
            for p in t.parameters():
                p.requires_grad_(False)
            use_packed_attention(t)
            self._teacher = t
        return self._teacher.to(device)

    def loss(self, model, inputs: dict, num_items=None):
        return distill_loss(model, self.teacher(next(model.parameters()).device), inputs, num_items,
                            self.temperature, self.ce_weight)


def distill_loss(student, teacher, inputs: dict, num_items=None, temperature: float = 1.0, ce_weight: float = 0.0):
    """(loss, student outputs): the token-weighted KL(teacher || student) over the labelled positions."""
    import torch
    import torch.nn.functional as F

    from toolchain.training.loss import IGNORE, labelled_logits, shifted_labels, token_mean

    shift = shifted_labels(inputs)
    keep = shift != IGNORE
    with torch.no_grad():
        t_logits, _ = labelled_logits(teacher, inputs, keep)
    s_logits, outputs = labelled_logits(student, inputs, keep)
    t = temperature
    total = F.kl_div(F.log_softmax(s_logits / t, dim=-1), F.log_softmax(t_logits / t, dim=-1), log_target=True,
                     reduction="sum") * (t * t)
    if ce_weight:
        total = total + ce_weight * F.cross_entropy(s_logits, shift[keep], reduction="sum")
    return token_mean(total, keep, num_items), outputs


def openings(texts, words: int = 4) -> list[str]:
    """The first ``words`` words of every sentence of ``texts``: where the teacher starts writing."""
    import re

    out = []
    for text in texts:
        for sentence in re.split(r"(?<=[.!?])\s+|\n", text):
            head = " ".join(sentence.split()[:words])
            if len(head.split()) == words and head not in out:
                out.append(head)
    return out


def teacher_texts(teacher_dir: Path, starts: list[str], count: int, new_tokens: int, seed: int = 0,
                  batch_size: int = 8, progress: bool = False) -> list[str]:
    """``count`` texts the teacher writes, sampled (temperature 1, top-p 0.95) from ``starts`` in turn.

    Distilling on the teacher's own writing gives the student the teacher's distribution on general
    text without any corpus (sequence-level distillation); the fine-tune rows alone teach only the task.
    """
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if count <= 0 or not starts:
        return []
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    texts: list[str] = []
    try:
        for first in tqdm(range(0, count, batch_size), desc="teacher writes", disable=not progress, leave=False):
            batch = [starts[i % len(starts)] for i in range(first, min(count, first + batch_size))]
            enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                ids = model.generate(**enc, do_sample=True, temperature=1.0, top_p=0.95, top_k=0,
                                     max_new_tokens=new_tokens, pad_token_id=tok.pad_token_id)
            texts += [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)]
    finally:
        torch.random.set_rng_state(generator_state)
    return [t for t in texts if t]
