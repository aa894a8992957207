"""The structured steps in one call: calibrate once, score, cut heads and MLP channels, drop layers.

Order and why: one calibration pass over the *dense* model gives every score (a one-shot method, as
Wanda and ShortGPT are); head groups and MLP channels are cut first in every layer, each layer by its
own dense scores, and whole layers are dropped last, by the dense model's angular distances, so no
score is ever read for a layer index that has moved. All arguments are checked against the model's
config first and every problem is reported at once (``structured.validate``).
"""
from __future__ import annotations

from typing import Sequence

from toolchain.core.errors import RecipeError
from toolchain.pruning.calibration import calibrate
from toolchain.pruning.families import TITLE, family_of, geometry
from toolchain.pruning.scores import head_group_scores, layer_importance, mlp_channel_scores, score_rule
from toolchain.pruning.structured import (
    drop_layers,
    parameter_count,
    remove_head_groups,
    shrink_mlp,
    validate,
)


def prune_structured(model, sequences: Sequence[Sequence[int]], *, layers: dict | None = None,
                     mlp: dict | None = None, heads: dict | None = None, method: str = "wanda",
                     where: str = "prune") -> dict:
    """Prune ``model`` in place. ``layers``: ``{"drop": n}`` or ``{"fraction": f}``; ``mlp``: ``{"keep":
    size}`` or ``{"fraction": f}``, optional ``"multiple"``; ``heads``: ``{"keep": query heads}`` or
    ``{"fraction": f}`` (of the GQA groups). ``method`` scores channels and groups (``magnitude`` or
    ``wanda``). Returns the figures: sizes before and after, dropped layers, angular distances."""
    family = family_of(model, where)
    problems = validate(model, where, layers=layers, mlp=mlp, heads=heads)
    if mlp or heads:
        try:
            score_rule(method, f"{where}.method")
        except RecipeError as e:
            problems += e.problems
    if problems:
        raise RecipeError(TITLE, problems)
    before = geometry(model, family)
    params_before = parameter_count(model)
    needs_linears = bool(mlp or heads) and score_rule(method).needs_calibration
    calib = calibrate(model, sequences, where=where, linears=needs_linears, layers=True)  # importance always reported
    stats = calib if needs_linears else None
    figures: dict = {"method": method, "calibration": calib.figures(), "before": before}
    if heads:
        scores = head_group_scores(model, method, stats, f"{where}.method")
        figures["query_heads"] = remove_head_groups(model, scores, where=f"{where}.heads", **heads)
    if mlp:
        scores = mlp_channel_scores(model, method, stats, f"{where}.method")
        figures["intermediate_size"] = shrink_mlp(model, scores, where=f"{where}.mlp", **mlp)
    if layers:
        figures["dropped_layers"] = drop_layers(model, layer_importance(calib, f"{where}.layers"),
                                                where=f"{where}.layers", **layers)
    figures["after"] = geometry(model, family)
    figures["parameters"] = {"before": params_before, "after": parameter_count(model)}
    return figures
