"""One pass of the model over the calibration sample, collecting what the scores need.

Two statistics, both from forward hooks during the same pass (``torch.no_grad``, one sequence at a
time, so no padding token ever enters a sum):

- **Per linear layer of the decoder blocks, the sum of squared input activations per input column**,
  ``sum_sq[j] = sum_t x_tj^2`` over every calibration token t. Wanda (Sun et al., 2023, "A Simple and
  Effective Pruning Approach for Large Language Models") scores a weight as ``|W_ij| * ||X_j||_2``,
  and ``||X_j||_2 = sqrt(sum_sq[j])``. It is the same quantity llama-imatrix accumulates as
  ``in_sum2`` (``toolchain.core.imatrix``), so the calibration stage's sample feeds the importance
  matrix, static int8 and pruning alike; sums are kept in float64, as there.
- **Per decoder block, the mean angular distance between its input and its output hidden states**,
  ``arccos(cos(h_in, h_out)) / pi`` per token, averaged over all tokens: the measure of Gromov et al.
  (2024, "The Unreasonable Ineffectiveness of the Deeper Layers") taken one block at a time, as
  ShortGPT's Block Influence (Men et al., 2024; ``1 - cos``) does. A block whose output points where
  its input did changes the residual stream least, so it is the first to drop: 0 for a block that
  is the identity, 0.5 for one whose output is orthogonal to its input. Hooks on the blocks see the
  residual stream itself; ``output_hidden_states`` would not do, since its last entry is taken after
  the final norm.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from toolchain.core.errors import StageError
from toolchain.pruning.families import Family, decoder_layers, family_of, get_module


@dataclass
class Calibration:
    """What one pass over the calibration sample measured."""

    sum_sq: dict = field(default_factory=dict)  # full module name -> float64 tensor [in_features]
    rows: dict = field(default_factory=dict)  # full module name -> tokens it saw
    angular: list = field(default_factory=list)  # per decoder block: mean angular distance in [0, 1]
    tokens: int = 0
    sequences: int = 0

    def column_norms(self, name: str):
        """``||X_j||_2`` per input column of the linear layer ``name`` (float64)."""
        if name not in self.sum_sq:
            raise StageError(f"calibration: no activations recorded for {name!r} (fix: calibrate the same model "
                             "that is being scored, after any earlier pruning step)")
        return self.sum_sq[name].sqrt()

    def figures(self) -> dict:
        """JSON-ready figures: tokens, sequences, the per-block angular distance."""
        return {"tokens": self.tokens, "sequences": self.sequences,
                "angular_distance": [round(float(a), 6) for a in self.angular]}


def linear_names(model, family: Family) -> list[str]:
    """Full module names of every decoder-layer linear projection, layer by layer."""
    n = len(decoder_layers(model, family))
    return [f"{family.layers}.{i}.{path}" for i in range(n) for path in family.linears]


def _hidden(out):
    """A decoder layer's output hidden states: the tensor itself (transformers 5) or its first element."""
    return out[0] if isinstance(out, (tuple, list)) else out


def angular_distance(h_in, h_out):
    """Per-token ``arccos(cos(h_in, h_out)) / pi`` over the last dimension, in float64."""
    import torch

    a, b = h_in.reshape(-1, h_in.shape[-1]).double(), h_out.reshape(-1, h_out.shape[-1]).double()
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(torch.finfo(torch.float64).tiny)
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


def calibrate(model, sequences: Sequence[Sequence[int]], *, where: str = "prune", linears: bool = True,
              layers: bool = True) -> Calibration:
    """Run ``model`` over ``sequences`` (token ids, one sequence per forward) and return the per-column
    sums of squared inputs of every decoder linear layer (``linears``) and each block's mean angular
    distance (``layers``)."""
    import torch

    family = family_of(model, where)
    seqs = [list(map(int, s)) for s in sequences if len(s)]
    if not seqs:
        raise StageError(f"{where}: the calibration sample holds no tokens (fix: run the calibrate stage on "
                         "a non-empty sample)")
    blocks = decoder_layers(model, family)
    calib = Calibration(angular=[0.0] * len(blocks) if layers else [])
    angle_sums = [torch.zeros((), dtype=torch.float64) for _ in blocks]
    angle_counts = [0] * len(blocks)
    inputs: dict[int, object] = {}
    handles = []

    def linear_hook(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            s = (x.double() ** 2).sum(0)
            calib.sum_sq[name] = s if name not in calib.sum_sq else calib.sum_sq[name] + s
            calib.rows[name] = calib.rows.get(name, 0) + x.shape[0]
        return hook

    def block_pre_hook(i):
        def hook(module, args, kwargs):
            inputs[i] = (args[0] if args else kwargs["hidden_states"]).detach()
        return hook

    def block_hook(i):
        def hook(module, args, kwargs, out):
            d = angular_distance(inputs.pop(i), _hidden(out).detach())
            angle_sums[i] += d.sum().cpu()
            angle_counts[i] += d.numel()
        return hook

    if linears:
        for name in linear_names(model, family):
            handles.append(get_module(model, name).register_forward_pre_hook(linear_hook(name)))
    if layers:
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(block_pre_hook(i), with_kwargs=True))
            handles.append(block.register_forward_hook(block_hook(i), with_kwargs=True))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for ids in seqs:
                model(input_ids=torch.tensor([ids], dtype=torch.long, device=device), use_cache=False)
                calib.tokens += len(ids)
                calib.sequences += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for name, s in calib.sum_sq.items():
        calib.sum_sq[name] = s.cpu()
        if not torch.isfinite(s).all():
            raise StageError(f"{where}: non-finite activations reached {name} on the calibration sample")
    if layers:
        if any(c == 0 for c in angle_counts):
            raise StageError(f"{where}: some decoder blocks never ran on the calibration sample")
        calib.angular = [float(s) / c for s, c in zip(angle_sums, angle_counts)]
    return calib
