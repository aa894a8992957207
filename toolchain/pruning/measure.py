"""What the prune stage measures on each model it compares (dense, cut, healed): perplexity on the
fine-tune domain (the eval split, its labelled tokens, as the eval loss is taken), logit agreement with
the dense model on the same tokens (KL, top-1), and size on disk.
"""
from __future__ import annotations

import math
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def weights_bytes(model_dir: Path) -> int:
    """Bytes of the checkpoint's weight files."""
    return sum(p.stat().st_size for p in Path(model_dir).iterdir() if p.suffix in WEIGHT_SUFFIXES)


def tokenized_rows(rows: list[dict], tokenizer, max_length: int) -> list[dict]:
    """The eval rows tokenised as training tokenises them (labels on the answer tokens)."""
    from toolchain.core.chat import tokenize_example

    out = []
    for row in rows:
        tok = tokenize_example(row, tokenizer, max_length)
        if tok is not None:
            out.append(tok)
    return out


def label_logits(model, example: dict):
    """(logits at the positions that predict a label, those labels) for one tokenised example."""
    import torch

    ids = torch.tensor([example["input_ids"]])
    labels = torch.tensor(example["labels"][1:] + [-100])
    keep = labels != -100
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0]
    return logits[keep].float(), labels[keep]


def compare(models: dict, examples: list[dict], reference: str = "dense") -> dict:
    """Per model: perplexity over the examples' label tokens; against ``reference``: mean KL and top-1."""
    import torch.nn.functional as F

    nll = {name: 0.0 for name in models}
    kl = {name: 0.0 for name in models}
    agree = {name: 0 for name in models}
    count = 0
    for ex in examples:
        ref_logits, labels = label_logits(models[reference], ex)
        if not len(labels):
            continue
        ref_logp = F.log_softmax(ref_logits, dim=-1)
        for name, model in models.items():
            logits = ref_logits if name == reference else label_logits(model, ex)[0]
            logp = F.log_softmax(logits, dim=-1)
            nll[name] += float(F.nll_loss(logp, labels, reduction="sum"))
            kl[name] += float((ref_logp.exp() * (ref_logp - logp)).sum())
            agree[name] += int((logits.argmax(-1) == ref_logits.argmax(-1)).sum())
        count += len(labels)
    if not count:
        return {}
    out = {}
    ref_ppl = math.exp(nll[reference] / count)
    for name in models:
        ppl = math.exp(nll[name] / count)
        out[name] = {"ppl": ppl, "delta_ppl": ppl / ref_ppl - 1.0, "kl_mean": kl[name] / count,
                     "top1": agree[name] / count, "tokens": count}
    return out
