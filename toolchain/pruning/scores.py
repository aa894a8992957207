"""Importance scores: per weight element (a registry by name), and from them per structure.

Per element (``WEIGHT_SCORES``):

- ``magnitude``: ``|W_ij|``, needs no data.
- ``wanda``: ``|W_ij| * ||X_j||_2``, the weight's magnitude times the L2 norm of its input feature j
  over the calibration tokens (Sun et al., 2023). A small weight on a feature that carries large
  activations (LLMs have a few such outlier features) matters more than its magnitude says. Wanda
  compares scores within one output row, which is what ``sparse.py`` does.

Per structure, each layer's scores rank only that layer's own structures (every layer keeps the same
count, so nothing is compared across layers):

- **MLP channel** k of a SwiGLU block computes ``down[:, k] * silu(gate[k] . x) * (up[k] . x)``: its
  output is a product of the three projections' parts, and it is dead when any one of them is zero.
  Its score is therefore the *product* of the three aggregates (the sum of the element scores over
  gate row k, up row k and down column k). A product also makes the ranking independent of the three
  matrices' overall scales, where a sum would let the largest-scaled matrix decide. With ``wanda`` the
  down column's factor already carries ``||h_k||``, the channel's measured activation.
- **GQA group** g (KV head g with its ``group`` query heads): its output is ``o[:, heads of g] @
  (softmax(q k^T) v_g)``. The attention weights are a convex combination, so the output's scale is
  set by the value path, v rows of g and o columns of g, and the group's score is the product of those
  two aggregates. q and k rows only shape the attention pattern (a group with zero q still outputs the
  mean of its values), so they are sliced with the group but are no factor of its score; with
  ``wanda`` the o columns' factor carries the measured norm of the group's attention output, in which
  q and k take part.
- **Layer importance**: the block's mean angular distance between input and output
  (``calibration.py``); lower = more redundant.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from toolchain.core.errors import Problem, RecipeError
from toolchain.pruning.calibration import Calibration
from toolchain.pruning.families import TITLE, Family, decoder_layers, family_of, geometry, get_module


@dataclass(frozen=True)
class WeightScore:
    """One per-element scoring rule."""

    name: str
    fn: Callable  # (weight [out, in] float32, column_norms [in] or None) -> scores [out, in] float64
    needs_calibration: bool
    summary: str


def _magnitude(weight, column_norms=None):
    return weight.detach().double().abs()


def _wanda(weight, column_norms):
    w = weight.detach().double().abs()
    return w * column_norms.to(device=w.device, dtype=w.dtype)[None, :]


WEIGHT_SCORES: dict[str, WeightScore] = {s.name: s for s in (
    WeightScore("magnitude", _magnitude, False, "|W|"),
    WeightScore("wanda", _wanda, True, "|W| x L2 norm of the input feature over the calibration tokens"),
)}


def score_rule(method: str, where: str = "prune.score") -> WeightScore:
    """The registry row for ``method``; RecipeError naming ``where`` and the known names."""
    rule = WEIGHT_SCORES.get(method)
    if rule is None:
        raise RecipeError(TITLE, [Problem(where, f"must be one of {', '.join(sorted(WEIGHT_SCORES))}", method,
                                          "pick a scoring rule from that list")])
    return rule


def weight_scores(weight, method: str = "magnitude", column_norms=None, where: str = "prune.score"):
    """Per-element scores of one ``[out, in]`` weight (float64, same shape)."""
    rule = score_rule(method, where)
    if rule.needs_calibration and column_norms is None:
        raise RecipeError(TITLE, [Problem(where, f"`{method}` needs activations from the calibration sample",
                                          method, "run with a calibration sample, or score by `magnitude`")])
    if column_norms is not None and column_norms.shape[-1] != weight.shape[1]:
        raise ValueError(f"column norms of length {column_norms.shape[-1]} for a weight with {weight.shape[1]} inputs")
    return rule.fn(weight, column_norms if rule.needs_calibration else None)


def module_scores(model, name: str, method: str = "magnitude", calib: Calibration | None = None,
                  where: str = "prune.score"):
    """Per-element scores of the linear module ``name`` (its full dotted name) of ``model``."""
    rule = score_rule(method, where)
    norms = calib.column_norms(name) if rule.needs_calibration and calib is not None else None
    return weight_scores(get_module(model, name).weight, method, norms, where)


def _layer_scores(model, family: Family, i: int, path: str, method, calib, where):
    return module_scores(model, f"{family.layers}.{i}.{path}", method, calib, where)


def mlp_channel_scores(model, method: str = "wanda", calib: Calibration | None = None,
                       where: str = "prune.score") -> list:
    """Per decoder layer, one float64 score per MLP intermediate channel: the product of the summed
    element scores of gate row k, up row k and down column k."""
    family = family_of(model, where)
    out = []
    for i in range(len(decoder_layers(model, family))):
        gate = _layer_scores(model, family, i, family.ffn("gate_proj"), method, calib, where).sum(1)
        up = _layer_scores(model, family, i, family.ffn("up_proj"), method, calib, where).sum(1)
        down = _layer_scores(model, family, i, family.ffn("down_proj"), method, calib, where).sum(0)
        out.append((gate * up * down).cpu())
    return out


def group_indices(group: int, group_size: int, head_dim: int) -> tuple[range, range]:
    """(q rows = o columns, k/v rows) of GQA group ``group``: its query heads ``group * group_size ..``
    and its KV head ``group``, each ``head_dim`` wide, in the projections' head-major layout."""
    q0 = group * group_size * head_dim
    return range(q0, q0 + group_size * head_dim), range(group * head_dim, (group + 1) * head_dim)


def head_group_scores(model, method: str = "wanda", calib: Calibration | None = None,
                      where: str = "prune.score") -> list:
    """Per decoder layer, one float64 score per GQA group (KV head): the product of the summed element
    scores of its v rows and of its o columns (the value path, which sets the group's output scale)."""
    import torch

    family = family_of(model, where)
    geo = geometry(model.config, family)
    out = []
    for i in range(len(decoder_layers(model, family))):
        v = _layer_scores(model, family, i, family.attn("v_proj"), method, calib, where).sum(1)
        o = _layer_scores(model, family, i, family.attn("o_proj"), method, calib, where).sum(0)
        scores = []
        for g in range(geo["kv_heads"]):
            q_rows, kv_rows = group_indices(g, geo["group"], geo["head_dim"])
            scores.append(v[kv_rows.start:kv_rows.stop].sum() * o[q_rows.start:q_rows.stop].sum())
        out.append(torch.stack(scores).cpu())
    return out


def layer_importance(calib: Calibration, where: str = "prune.layers") -> list[float]:
    """Each decoder block's mean angular distance (lower = more redundant)."""
    if not calib.angular:
        raise RecipeError(TITLE, [Problem(where, "needs the blocks' angular distances from the calibration pass",
                                          None, "calibrate with layers=True")])
    return list(calib.angular)


def rank_lowest_first(scores) -> list[int]:
    """Indices of ``scores`` from the lowest score up (ties: the earlier index first)."""
    values = [float(s) for s in scores]
    return sorted(range(len(values)), key=lambda i: (values[i], i))
