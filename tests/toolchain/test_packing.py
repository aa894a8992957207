"""Padding-free packing and the labelled-positions loss (toolchain/training/batching.py, loss.py).

A packed row must behave exactly like its examples run one by one: no token attends across
examples (changing one example leaves every other example's logits unchanged), each example's
logits equal its unpacked logits, and the loss of a packed row equals the token-weighted mean of the
per-example losses (and the loss of the same examples padded), gradients included. The
harness trained with data.packing on and off takes the same steps over the same tokens.
"""
from __future__ import annotations

import pytest
import torch

from tests.tolerances import PACKED_LEAK_EFFECT, PACKED_VS_PADDED_TRAINING, PACKED_VS_UNPACKED_LOGITS, PACKED_VS_UNPACKED_LOSS
from toolchain.core.chat import tokenize_example
from toolchain.training.batching import IGNORE, PackCollator, PadCollator, real_tokens
from toolchain.training.loss import selected_loss

# edgesmith_packed: the per-example attention the harness switches to for packed rows (packed_attention.py)
ATTENTION = ["sdpa", "eager", "edgesmith_packed"]


def load(model_dir, attn):
    from transformers import AutoModelForCausalLM

    from toolchain.training.packed_attention import use_packed_attention

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="sdpa" if attn == "edgesmith_packed" else attn)
    if attn == "edgesmith_packed":
        assert use_packed_attention(model) and model.config._attn_implementation == attn
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def examples(tokenizer, dates_rows):
    """Chat examples (prompt tokens masked) and text examples (every token learnt) of unequal lengths."""
    chats = [tokenize_example(r, tokenizer, 64) for r in dates_rows[:3]]
    texts = [tokenize_example({"text": " ".join(m["content"] for m in r["messages"]) * k}, tokenizer, 64)
             for k, r in zip((1, 3), dates_rows[3:5])]
    out = [chats[0], texts[1], chats[1], texts[0], chats[2]]
    assert len({len(e["input_ids"]) for e in out}) >= 4
    return out


def close(got, want, tier):
    torch.testing.assert_close(got, want, atol=tier.atol, rtol=tier.rtol)


def per_example_logits(model, examples):
    with torch.no_grad():
        return [model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits[0] for e in examples]


def packed_logits(model, examples):
    batch = PackCollator()(examples)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
    bounds = torch.tensor([0] + [len(e["input_ids"]) for e in examples]).cumsum(0).tolist()
    return [logits[a:b] for a, b in zip(bounds, bounds[1:])]


def test_collators_keep_the_same_tokens_and_labels(examples):
    packed, padded = PackCollator()(examples), PadCollator(pad_id=0)(examples)
    lengths = [len(e["input_ids"]) for e in examples]
    assert packed["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in packed
    assert real_tokens(packed) == real_tokens(padded) == sum(lengths)
    assert padded["input_ids"].shape == (len(examples), max(lengths))
    assert int((packed["shift_labels"] != IGNORE).sum()) == int((padded["shift_labels"] != IGNORE).sum())
    starts = torch.tensor([0] + lengths[:-1]).cumsum(0)
    assert (packed["position_ids"][0, starts] == 0).all()
    # the last position of every example predicts nothing (not the next example's first token)
    ends = torch.tensor(lengths).cumsum(0) - 1
    assert (packed["shift_labels"][0, ends] == IGNORE).all()
    assert PadCollator(pad_id=0, pad_to=80)(examples)["input_ids"].shape == (len(examples), 80)


@pytest.mark.parametrize("attn", ATTENTION)
def test_no_attention_crosses_examples(tiny_model_dir, examples, attn):
    model = load(tiny_model_dir, attn)
    alone = per_example_logits(model, examples)
    for got, want in zip(packed_logits(model, examples), alone):
        close(got, want, PACKED_VS_UNPACKED_LOGITS)

    # change example 0's tokens: every other example's logits in the pack stay as they were
    changed = [dict(examples[0], input_ids=[(t * 7 + 3) % 200 + 10 for t in examples[0]["input_ids"]])] + examples[1:]
    before, after = packed_logits(model, examples), packed_logits(model, changed)
    assert float((before[0] - after[0]).abs().max()) > PACKED_LEAK_EFFECT.lo  # the change itself shows
    for got, want in zip(after[1:], before[1:]):
        close(got, want, PACKED_VS_UNPACKED_LOGITS)

    # the control: concatenated without restarting positions (the naive packing), attention leaks
    batch = PackCollator()(changed)
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
    n0 = len(examples[0]["input_ids"])
    leak = float((leaky[n0:n0 + len(examples[1]["input_ids"])] - before[1]).abs().max())
    assert leak > PACKED_LEAK_EFFECT.lo, leak


def reference_loss(model, examples):
    """The model's own loss per example (its mean over label tokens), weighted by each example's label tokens."""
    total, count = 0.0, 0
    for e in examples:
        n = sum(1 for label in e["labels"][1:] if label != IGNORE)
        out = model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]]), use_cache=False)
        total, count = total + out.loss * n, count + n
    return total / count


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("attn", ATTENTION)
def test_packed_loss_equals_per_example_losses(tiny_model_dir, examples, attn):
    model = load(tiny_model_dir, attn)
    want = reference_loss(model, examples)
    want.backward()
    want_grad, _ = grads(model), model.zero_grad()
    for collate in (PackCollator(), PadCollator(pad_id=0)):
        got, _ = selected_loss(model, collate(examples))
        close(got, want, PACKED_VS_UNPACKED_LOSS)
        got.backward()
        close(grads(model), want_grad, PACKED_VS_UNPACKED_LOSS)
        model.zero_grad()
    # num_items (the Trainer's count over an accumulated step) divides the sum instead of this batch's count
    n = sum(1 for e in examples for label in e["labels"][1:] if label != IGNORE)
    half, _ = selected_loss(model, PackCollator()(examples), num_items=torch.tensor(2 * n))
    close(half * 2, want.detach(), PACKED_VS_UNPACKED_LOSS)


def test_packed_attention_splits_only_packed_rows(tiny_model_dir, examples):
    """A padded batch under edgesmith_packed gets sdpa's own mask and result; a packed row is cut at its restarts."""
    from toolchain.training.packed_attention import _segments

    sdpa, packed = load(tiny_model_dir, "sdpa"), load(tiny_model_dir, "edgesmith_packed")
    batch = PadCollator(pad_id=0)(examples)
    with torch.no_grad():
        want = sdpa(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = packed(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    keep = batch["attention_mask"].bool()
    close(got[keep], want[keep], PACKED_VS_UNPACKED_LOGITS)
    assert _segments(PackCollator()(examples)["position_ids"]) == [len(e["input_ids"]) for e in examples]
    assert _segments(torch.arange(7)[None]) == [7] and _segments(torch.arange(3, 7)[None]) is None
    assert _segments(torch.zeros(2, 4, dtype=torch.long)) is None  # a padded batch: transformers' path


def test_loss_through_peft_and_without_logits_to_keep(tiny_model_dir, examples):
    from peft import LoraConfig, get_peft_model

    model = load(tiny_model_dir, "sdpa")
    want = reference_loss(model, examples).detach()
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    batch = PackCollator()(examples)
    got, out = selected_loss(peft_model, batch)
    close(got, want, PACKED_VS_UNPACKED_LOSS)  # a fresh LoRA (B = 0) leaves the function unchanged
    labelled = int((batch["shift_labels"] != IGNORE).sum())
    assert out.logits.shape == (labelled, model.config.vocab_size)  # no logits for unlabelled positions
    full, out = selected_loss(peft_model, batch, keep_kwarg=False)
    close(full, got, PACKED_VS_UNPACKED_LOSS)
    assert out.logits.shape[1] == batch["input_ids"].shape[1]


def test_harness_packed_and_padded_train_alike(tmp_path, tiny_model_dir, dates_rows):
    from toolchain.pipeline.recipe import DataSection, TrainSection
    from toolchain.training.lora import METHOD
    from toolchain.training.trainer import train

    rows = [{"text": " ".join(m["content"] for m in r["messages"]) * (1 + i % 4)} for i, r in enumerate(dates_rows[:24])]
    runs = {}
    for packing in (False, True):
        dcfg = DataSection(path="-", max_length=64, packing=packing)
        tcfg = TrainSection(max_steps=3, batch_size=4, learning_rate=1e-4, logging_steps=1, eval_every="steps",
                            eval_steps=3, save_checkpoints=False, threads=1, seed=0)
        tcfg.lora.rank, tcfg.lora.alpha = 4, 8
        torch.manual_seed(0)
        runs[packing] = train(tiny_model_dir, rows[:16], rows[16:], tcfg, dcfg, tmp_path / str(packing), METHOD,
                              progress=False)
    padded, packed = runs[False], runs[True]
    assert packed["packed_attention"] and not padded["packed_attention"]
    assert packed["steps"] == padded["steps"] == 3
    assert packed["train_tokens"] == padded["train_tokens"] > 0
    got = [h["loss"] for h in packed["log_history"] if "loss" in h]
    want = [h["loss"] for h in padded["log_history"] if "loss" in h]
    assert len(got) == len(want) == 3
    for g, w in zip(got + [packed["eval_loss"]], want + [padded["eval_loss"]]):
        assert abs(g - w) <= PACKED_VS_PADDED_TRAINING.atol, (g, w)
    assert len(set(want)) == 3  # the steps saw different batches: a reordered run would not match
