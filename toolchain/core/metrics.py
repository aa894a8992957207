"""Quality against the reference: the numbers every target is judged by, in one place.

KL(reference || target) per position, top-1 agreement, perplexity on the held-out text, and how
much of the reference's greedy output a target reproduces. Used by every runtime's benchmark
(``runtimes.base``), the WebLLM export's NumPy check and the reference stage.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from toolchain.core.benchschema import Quality


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def greedy_quality(ref_greedy: list[list[int]], greedy: list[list[int]]) -> Quality:
    """Quality from greedy outputs alone, for a runtime that cannot afford logits over the quality
    text: the logit metrics are NaN (not measured), which the gates report as such."""
    nan = float("nan")
    match, prefix = _greedy_scores(ref_greedy, greedy)
    return Quality(ppl=nan, ref_ppl=nan, kl_mean=nan, kl_max=nan, top1_agreement=nan,
                   greedy_match=match, greedy_prefix=prefix, tokens=0)


def _greedy_scores(ref_greedy: list[list[int]], greedy: list[list[int]]) -> tuple[float, float]:
    """(share of prompts whose greedy output equals the reference's, mean share of the reference's
    tokens reproduced before the first difference)."""
    matches, prefixes = [], []
    for r, g in zip(ref_greedy, greedy):
        matches.append(float(list(r) == list(g)))
        n = 0
        for a, b in zip(r, g):
            if a != b:
                break
            n += 1
        prefixes.append(n / max(1, len(r)))
    return (float(np.mean(matches)) if matches else float("nan"),
            float(np.mean(prefixes)) if prefixes else float("nan"))


def quality_against(ref_logprobs: np.ndarray, logits: np.ndarray, ids: Sequence[int],
                    ref_greedy: list[list[int]], greedy: list[list[int]]) -> Quality:
    """Compare a target's logits and greedy outputs with the reference's.

    ``ref_logprobs`` and ``logits`` are ``[T, V]`` for the same ``ids``; position t predicts
    ``ids[t+1]``. KL is KL(reference || target) in nats, averaged over positions.
    """
    ids = np.asarray(ids)
    lp_ref = ref_logprobs.astype(np.float64)
    lp = log_softmax(logits)
    kl = (np.exp(lp_ref) * (lp_ref - lp)).sum(axis=-1)
    nxt = ids[1:]
    nll = -lp[np.arange(len(nxt)), nxt]
    ref_nll = -lp_ref[np.arange(len(nxt)), nxt]
    top1 = (lp_ref.argmax(-1) == lp.argmax(-1)).mean()
    match, prefix = _greedy_scores(ref_greedy, greedy)
    return Quality(
        ppl=float(np.exp(nll.mean())), ref_ppl=float(np.exp(ref_nll.mean())),
        kl_mean=float(kl.mean()), kl_max=float(kl.max()), top1_agreement=float(top1),
        greedy_match=match, greedy_prefix=prefix,
        tokens=int(len(nxt)),
    )
