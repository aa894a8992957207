"""Turning tokenized examples into training batches: dynamic padding, or padding-free packing.

Both collators take the same list of examples (the sampler's ``batch_size`` of them), so a packed
step and a padded step hold the same examples, the same real tokens and the same label tokens;
only the layout differs:

- ``PadCollator``: rows right-padded to the longest example of the batch (or to ``pad_to``),
  labels padded with -100, attention_mask 0 on padding.
- ``PackCollator``: one row of shape (1, sum of lengths), no padding and no attention_mask;
  ``position_ids`` restart at 0 for every example. transformers (``masking_utils``:
  ``find_packed_sequence_indices``) reads the restarts when attention_mask is None and no cache
  is used, and builds a block-diagonal causal mask, so no token attends across examples (the
  loss calls the model with ``use_cache=False`` for that reason; ``tests/toolchain/test_packing.py``
  proves it). ``shift_labels`` carries each position's next-token label, -100 at the end of
  every example, so no position learns the first token of the next example.

Either way, ``shift_labels`` is what the loss (``toolchain.training.loss``) and the Trainer's
token count (``num_items_in_batch``) read, so the loss is the token-weighted mean over the same
label tokens whichever layout is used.
"""
from __future__ import annotations

IGNORE = -100


def next_token_labels(labels: list[int]) -> list[int]:
    """Position i's target is label i+1; the last position of an example has none."""
    return list(labels[1:]) + [IGNORE]


class PadCollator:
    """Right-pads input_ids with the pad id, labels with -100, attention_mask with 0.

    ``pad_to`` pads every batch to that width (the plain pad-to-max layout) instead of the
    longest example of the batch."""

    def __init__(self, pad_id: int, pad_to: int | None = None):
        self.pad_id = pad_id
        self.pad_to = pad_to

    def __call__(self, batch: list[dict]) -> dict:
        import torch

        width = max(len(ex["input_ids"]) for ex in batch)
        if self.pad_to:
            width = max(width, self.pad_to)

        def padded(rows, fill):
            return torch.tensor([r + [fill] * (width - len(r)) for r in rows], dtype=torch.long)
        return {"input_ids": padded([ex["input_ids"] for ex in batch], self.pad_id),
                "labels": padded([ex["labels"] for ex in batch], IGNORE),
                "shift_labels": padded([next_token_labels(ex["labels"]) for ex in batch], IGNORE),
                "attention_mask": padded([[1] * len(ex["input_ids"]) for ex in batch], 0)}


class PackCollator:
    """The batch's examples concatenated into one row, position_ids restarting per example."""

    def __call__(self, batch: list[dict]) -> dict:
        import torch

        ids, labels, shift, pos = [], [], [], []
        for ex in batch:
            ids += ex["input_ids"]
            labels += ex["labels"]
            shift += next_token_labels(ex["labels"])
            pos += range(len(ex["input_ids"]))
        return {"input_ids": torch.tensor([ids], dtype=torch.long),
                "labels": torch.tensor([labels], dtype=torch.long),
                "shift_labels": torch.tensor([shift], dtype=torch.long),
                "position_ids": torch.tensor([pos], dtype=torch.long)}


def collator_for(packing: bool, pad_id: int):
    """``data.packing``: padding-free packing; otherwise dynamic padding."""
    return PackCollator() if packing else PadCollator(pad_id)


def real_tokens(batch: dict) -> int:
    """Non-pad tokens in a collated batch (a packed row has no padding)."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
