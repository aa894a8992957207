"""Unstructured and N:M sparsity masks, offered as quality experiments only.

No target edgesmith ships to runs a sparse model faster or smaller: onnxruntime densifies sparse
initialisers (onnxruntime #2121), XNNPACK's sparse path covers only 1x1 fp32 convolutions, llama.cpp
and MLC have no sparse kernels, and vLLM removed its 2:4 kernels for lack of use. A masked model is
still a dense checkpoint with zeros in it; what these masks let the report measure is the *quality*
cost of a sparsity level next to the structured variants, at the same speed and size as dense.

- **Unstructured**: in every output row of every decoder linear weight (q/k/v/o, gate/up/down;
  never the embeddings or the LM head, which are one tensor when tied and which no sparse method
  prunes) the ``floor(fraction * in_features)`` lowest-scoring weights are zeroed. Comparing within a
  row is Wanda's rule (per-output comparison groups); it keeps every output feature alive.
- **N:M** (2:4, 4:8): in every group of M consecutive input weights of a row the N highest-scoring
  are kept, the layout NVIDIA's sparse tensor cores read (Mishra et al., 2021).
- Scores are ``magnitude`` or ``wanda`` (``scores.py``).

A merge destroys a mask: merging a LoRA adapter adds a dense delta ``B @ A`` to every masked weight.
``save_masks`` writes the mask (safetensors, one bool tensor per module, written atomically) beside
the pruned model, and ``reapply_masks`` zeros the same positions again after any merge.
``sparsity`` reports the zeros actually in the weights, per layer and overall.
"""
from __future__ import annotations

import json
import math
import numbers
from pathlib import Path

from toolchain.core.errors import NO_VALUE, Problem, RecipeError, StageError
from toolchain.core.files import write_bytes_atomic
from toolchain.pruning.calibration import Calibration, linear_names
from toolchain.pruning.families import TITLE, decoder_layers, family_of, get_module
from toolchain.pruning.scores import module_scores

PATTERNS = {"2:4": (2, 4), "4:8": (4, 8)}  # the N:M layouts sparse kernels have shipped for
MASK_FORMAT = "edgesmith-sparsity-mask"


def _fail(where: str, rule: str, value=NO_VALUE, fix: str = ""):
    raise RecipeError(TITLE, [Problem(where, rule, value, fix)])


def parse_pattern(pattern, where: str = "prune.sparse.pattern") -> tuple[int, int]:
    """``"2:4"`` (or ``(2, 4)``) -> (N, M); N and M positive integers, N < M."""
    if isinstance(pattern, str):
        parts = pattern.split(":")
        if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
            pattern = (int(parts[0]), int(parts[1]))
    if (not isinstance(pattern, (tuple, list)) or len(pattern) != 2
            or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in pattern)
            or not 0 < pattern[0] < pattern[1]):
        _fail(where, "must be N:M with 0 < N < M (keep N of every M consecutive weights)", pattern,
              f"use one of {', '.join(PATTERNS)}")
    return int(pattern[0]), int(pattern[1])


def _fraction(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 1:
        _fail(where, "must be a number above 0 and below 1 (the share of each row's weights zeroed)", value)
    return float(value)


def unstructured_masks(model, fraction: float, *, method: str = "magnitude", calib: Calibration | None = None,
                       where: str = "prune.sparse") -> dict:
    """{module name: bool mask (True = keep)} zeroing ``floor(fraction * in_features)`` weights per row."""
    import torch

    fraction = _fraction(fraction, f"{where}.fraction")
    masks = {}
    for name in linear_names(model, family_of(model, where)):
        scores = module_scores(model, name, method, calib, f"{where}.method")
        k = math.floor(fraction * scores.shape[1])
        mask = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
        if k:
            mask.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, False)
        masks[name] = mask.cpu()
    return masks


def nm_masks(model, pattern="2:4", *, method: str = "magnitude", calib: Calibration | None = None,
             where: str = "prune.sparse") -> dict:
    """{module name: bool mask} keeping the N highest-scoring weights in every M consecutive inputs of a row."""
    import torch

    n, m = parse_pattern(pattern, f"{where}.pattern")
    names = linear_names(model, family_of(model, where))
    odd = {name: get_module(model, name).in_features for name in names if get_module(model, name).in_features % m}
    if odd:
        _fail(f"{where}.pattern", f"needs every input width divisible by {m}", dict(list(odd.items())[:4]),
              "pick an M that divides the layers' input widths")
    masks = {}
    for name in names:
        scores = module_scores(model, name, method, calib, f"{where}.method")
        rows, cols = scores.shape
        groups = scores.reshape(rows, cols // m, m)
        mask = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
        mask.scatter_(2, torch.topk(groups, n, dim=2).indices, True)
        masks[name] = mask.reshape(rows, cols).cpu()
    return masks


def sparse_masks(model, *, fraction=None, pattern=None, method: str = "magnitude", calib: Calibration | None = None,
                 where: str = "prune.sparse") -> dict:
    """Unstructured (``fraction``) or N:M (``pattern``) masks: exactly one of the two."""
    if (fraction is None) == (pattern is None):
        _fail(where, "needs exactly one of `fraction` (unstructured) and `pattern` (N:M)",
              {"fraction": fraction, "pattern": pattern}, f"set {where}.fraction or {where}.pattern")
    if pattern is not None:
        return nm_masks(model, pattern, method=method, calib=calib, where=where)
    return unstructured_masks(model, fraction, method=method, calib=calib, where=where)


def apply_masks(model, masks: dict, where: str = "prune.sparse") -> int:
    """Zero every weight a mask leaves out (in place); returns how many of them were nonzero. Every
    decoder linear must have a mask of its shape and every mask a module (missing and extra named)."""
    import torch

    names = set(linear_names(model, family_of(model, where)))
    missing, extra = sorted(names - set(masks)), sorted(set(masks) - names)
    if missing or extra:
        raise StageError(f"{where}: the mask does not fit this model: missing {missing[:4]} ({len(missing)}), "
                         f"extra {extra[:4]} ({len(extra)}) (fix: re-apply the mask saved for this model)")
    restored = 0
    with torch.no_grad():
        for name in sorted(names):
            weight = get_module(model, name).weight
            mask = masks[name].to(device=weight.device)
            if tuple(mask.shape) != tuple(weight.shape):
                raise StageError(f"{where}: mask {name} has shape {tuple(mask.shape)}, the weight "
                                 f"{tuple(weight.shape)} (fix: re-apply the mask saved for this model)")
            restored += int(((weight != 0) & ~mask).sum())
            weight.mul_(mask.to(weight.dtype))
    return restored


def save_masks(masks: dict, path, meta: dict | None = None) -> Path:
    """Write ``masks`` as one safetensors file (bool tensors by module name, ``meta`` as JSON), atomically."""
    import torch
    from safetensors.torch import save

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: mask.detach().to("cpu", dtype=torch.bool).contiguous() for name, mask in masks.items()}
    metadata = {"format": MASK_FORMAT, "meta": json.dumps(meta or {}, sort_keys=True)}
    write_bytes_atomic(path, save(tensors, metadata=metadata))
    return path


def load_masks(path) -> dict:
    """The masks ``save_masks`` wrote; StageError for a file that is not one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise StageError(f"sparsity mask {path} does not exist (fix: point at the prune stage's mask file)")
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("format") != MASK_FORMAT:
            raise StageError(f"{path} is not an edgesmith sparsity mask (no format {MASK_FORMAT!r} in its metadata)")
        return {name: f.get_tensor(name) for name in f.keys()}


def reapply_masks(model, masks, where: str = "prune.sparse") -> int:
    """After a merge: zero the masked positions again (``masks`` a dict or a file ``save_masks`` wrote);
    returns how many weights the merge had made nonzero there."""
    return apply_masks(model, masks if isinstance(masks, dict) else load_masks(masks), where)


def sparsity(model, where: str = "prune.sparse") -> dict:
    """The zeros measured in the decoder linear weights: per module, per layer and overall."""
    family = family_of(model, where)
    modules, layers = {}, []
    total_zeros = total = 0
    for i in range(len(decoder_layers(model, family))):
        zeros = count = 0
        for path in family.linears:
            name = f"{family.layers}.{i}.{path}"
            weight = get_module(model, name).weight
            z, c = int((weight == 0).sum()), weight.numel()
            modules[name] = {"zeros": z, "weights": c, "sparsity": z / c}
            zeros, count = zeros + z, count + c
        layers.append({"layer": i, "zeros": zeros, "weights": count, "sparsity": zeros / count})
        total_zeros, total = total_zeros + zeros, total + count
    return {"overall": total_zeros / total if total else 0.0, "zeros": total_zeros, "weights": total,
            "layers": layers, "modules": modules}
