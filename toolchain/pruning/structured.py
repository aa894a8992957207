"""Structured pruning that leaves a standard checkpoint: whole decoder layers, MLP channels, GQA groups.

The rule, and why: no runtime edgesmith ships to (onnxruntime, llama.cpp, MLC/WebLLM, transformers.js)
runs unstructured or 2:4 sparsity faster or smaller, so only removing whole structures pays, and only
while the result is still a *standard* config with **the same shape in every layer**: GGUF, MLC and
transformers.js describe a model by one ``intermediate_size`` and one head count, so per-layer sizes
cannot be exported. Hence:

- **Layers**: drop ``drop`` blocks (or a ``fraction`` of them), the lowest angular distance first
  (``calibration.py``), keeping at least one; the survivors are renumbered (``self_attn.layer_idx``
  indexes the KV cache) and ``num_hidden_layers`` and per-layer lists (``layer_types``) follow.
- **MLP channels**: the same ``intermediate_size`` in every layer, a multiple of ``multiple`` (32 by
  default: ONNX MatMulNBits, MLC and ExecuTorch quantise in groups of 32 along the input, which for
  ``down_proj`` is the intermediate size; 256 where asked: llama.cpp's K-quants need rows divisible by
  256, and SmolLM2's 576-wide rows are not, so its Q4_K_M falls back to wider types for most
  matrices). Each layer keeps its own highest-scoring channels: gate/up rows and down columns sliced
  with the same indices.
- **Attention heads**, by whole GQA groups only (a KV head with the query heads that read it), the
  same number of groups in every layer: q/k/v rows (and biases) and o columns sliced together;
  ``num_attention_heads`` and ``num_key_value_heads`` follow and ``head_dim`` is written explicitly,
  since transformers (and every exporter here) otherwise derives it as ``hidden_size //
  num_attention_heads``, which is wrong once heads are gone. Removing single query heads would break
  the grouping (heads per KV head must stay one number).

Every operation edits the model in place, updates its config, and checks that every config size
agrees with the tensors (``check_consistent``); ``save_pretrained`` then gives a checkpoint that
``AutoModelForCausalLM.from_pretrained`` reloads as it is. Embeddings and the LM head are never
touched, so tied embeddings stay tied. Bad input raises a RecipeError naming ``<where>.<argument>``;
``validate`` gives the same problems from config.json alone, before any work.
"""
from __future__ import annotations

import inspect
import math
import numbers
from typing import Sequence

from toolchain.core.errors import NO_VALUE, Problem, RecipeError, StageError
from toolchain.pruning.families import TITLE, config_value, decoder_layers, family_of, geometry, get_module
from toolchain.pruning.scores import group_indices, rank_lowest_first

MLP_MULTIPLE = 32  # group-32 quantisers: ONNX MatMulNBits, MLC q4f16_1, ExecuTorch
K_QUANT_MULTIPLE = 256  # llama.cpp K-quants: QK_K = 256 weights per super-block along a row


def _fail(where: str, rule: str, value=NO_VALUE, fix: str = ""):
    raise RecipeError(TITLE, [Problem(where, rule, value, fix)])


def _count(value, where: str, rule: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        _fail(where, f"must be a positive integer ({rule})", value)
    return int(value)


def _fraction(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 1:
        _fail(where, "must be a number above 0 and below 1 (the share removed)", value)
    return float(value)


def _at_least(x: float) -> str:
    """``x`` rounded *up* to 3 decimals: the smallest fraction the fix may quote and still reach ``x``."""
    return f"{math.ceil(x * 1000 - 1e-9) / 1000:.3f}"


def _at_most(x: float) -> str:
    return f"{math.floor(x * 1000 + 1e-9) / 1000:.3f}"


def _one_of(where: str, **given) -> tuple[str, object]:
    set_ = {k: v for k, v in given.items() if v is not None}
    if len(set_) != 1:
        _fail(where, f"needs exactly one of {', '.join(f'`{k}`' for k in given)}", set_ or None,
              "set one of " + " or ".join(f"{where}.{k}" for k in given))
    return next(iter(set_.items()))


def layers_to_drop(config, *, drop=None, fraction=None, where: str = "prune.layers") -> int:
    """How many decoder layers ``drop`` / ``fraction`` removes from ``config`` (dict or object); at least
    one, and at least one layer left."""
    n = geometry(config, family_of(config, where))["layers"]
    key, value = _one_of(where, drop=drop, fraction=fraction)
    if key == "fraction":
        count = math.floor(_fraction(value, f"{where}.fraction") * n)
        if count < 1:
            _fail(f"{where}.fraction", f"removes no layer of {n}", value,
                  f"use at least {_at_least(1 / n)} to remove one layer")
        return count
    count = _count(value, f"{where}.drop", "the number of layers removed")
    if count >= n:
        _fail(f"{where}.drop", f"must leave at least one of the model's {n} layers", value, f"use at most {n - 1}")
    return count


def mlp_target(config, *, keep=None, fraction=None, multiple: int = MLP_MULTIPLE, where: str = "prune.mlp") -> int:
    """The intermediate size every layer keeps: ``keep`` as given, or the size left by removing
    ``fraction`` rounded down to ``multiple``; a multiple of ``multiple``, at least one multiple."""
    size = geometry(config, family_of(config, where))["intermediate"]
    multiple = _count(multiple, f"{where}.multiple", f"{MLP_MULTIPLE} for group-32 quantisers, "
                      f"{K_QUANT_MULTIPLE} for llama.cpp K-quants")
    key, value = _one_of(where, keep=keep, fraction=fraction)
    if key == "fraction":
        target = math.floor(size * (1 - _fraction(value, f"{where}.fraction")) / multiple) * multiple
        if target < multiple:
            _fail(f"{where}.fraction", f"leaves fewer than {multiple} of {size} channels ({where}.multiple)", value,
                  f"use at most {_at_most(1 - multiple / size)}")
        return target  # below ``size`` for any fraction above 0: the rounding is down
    target = _count(value, f"{where}.keep", "the intermediate size kept")
    if target < multiple or target % multiple:
        _fail(f"{where}.keep", f"must be a multiple of {multiple} ({where}.multiple), at least {multiple}", value,
              f"use {max(multiple, target // multiple * multiple)}")
    if target > size:
        _fail(f"{where}.keep", f"must not exceed the model's intermediate_size {size}", value)
    return target


def groups_to_keep(config, *, keep=None, fraction=None, where: str = "prune.heads") -> int:
    """How many GQA groups every layer keeps: ``keep`` query heads (a multiple of the query heads per KV
    head) or what removing ``fraction`` of the groups (rounded down) leaves; at least one group."""
    geo = geometry(config, family_of(config, where))
    heads, kv, group = geo["heads"], geo["kv_heads"], geo["group"]
    if not group:
        _fail(where, "needs num_attention_heads to be a multiple of num_key_value_heads", f"{heads} / {kv}")
    family = family_of(config, where)
    hidden = int(config_value(config, "hidden_size"))
    loadable = [g * group for g in range(1, kv + 1) if not family.heads_divide_hidden or hidden % (g * group) == 0]
    key, value = _one_of(where, keep=keep, fraction=fraction)
    if key == "fraction":
        removed = math.floor(_fraction(value, f"{where}.fraction") * kv)
        if kv == 1:
            _fail(f"{where}.fraction", "removes a whole GQA group, and this model has one KV head", value,
                  f"remove the {where} section")
        if removed < 1:
            _fail(f"{where}.fraction", f"removes no GQA group of {kv}", value, f"use at least {_at_least(1 / kv)}")
        target = (kv - removed) * group
        where_key = f"{where}.fraction"
    else:
        target = _count(value, f"{where}.keep", "the query heads kept")
        where_key = f"{where}.keep"
        if target % group:
            _fail(where_key, f"must be a multiple of {group}: heads go in whole GQA groups of {group} query heads "
                  f"per KV head ({heads} heads, {kv} KV heads)", value, f"use {max(group, target // group * group)}")
        if target > heads:
            _fail(where_key, f"must not exceed the model's {heads} query heads", value)
    if target not in loadable:
        smaller = [h for h in loadable if h < heads]
        _fail(where_key, f"keeps {target} query heads, which do not divide hidden_size {hidden}: "
              f"transformers' {family.architectures[0]} config refuses that even with head_dim explicit", value,
              f"keep one of {smaller} query heads ({where}.keep)" if smaller else f"remove the {where} section")
    return target // group


RESOLVERS = {"layers": layers_to_drop, "mlp": mlp_target, "heads": groups_to_keep}


def validate(config, where: str = "prune", **sections) -> list[Problem]:
    """Every problem of the given sections at once, from config.json alone: ``validate(cfg,
    layers={"drop": 2}, mlp={"keep": 1024, "multiple": 256}, heads={"fraction": 0.34})``."""
    try:
        family_of(config, where)
    except RecipeError as e:
        return e.problems
    problems: list[Problem] = []
    for name, args in sections.items():
        if args is None:
            continue
        if name not in RESOLVERS:
            problems.append(Problem(f"{where}.{name}", f"is not a pruning section; known: {', '.join(RESOLVERS)}",
                                    NO_VALUE))
            continue
        known = [p for p in inspect.signature(RESOLVERS[name]).parameters if p not in ("config", "where")]
        unknown = sorted(set(args) - set(known))
        if unknown:
            problems += [Problem(f"{where}.{name}.{key}", f"is not a key of this section; known: {', '.join(known)}",
                                 NO_VALUE) for key in unknown]
            continue
        try:
            RESOLVERS[name](config, where=f"{where}.{name}", **args)
        except RecipeError as e:
            problems += e.problems
    return problems


# --- editing the model ------------------------------------------------------------------------------
def _slice_linear(linear, rows=None, cols=None) -> None:
    """Keep output ``rows`` (with the bias) and input ``cols`` (index tensors) of an nn.Linear, in place."""
    import torch

    w = linear.weight.detach()
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
        if linear.bias is not None:
            linear.bias = torch.nn.Parameter(linear.bias.detach().index_select(0, rows.to(w.device)).clone(),
                                             requires_grad=linear.bias.requires_grad)
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    linear.weight = torch.nn.Parameter(w.contiguous().clone(), requires_grad=linear.weight.requires_grad)
    linear.out_features, linear.in_features = w.shape


def _set_config(model, key: str, value) -> None:
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    setattr(text, key, value)


def remove_layers(model, indices: Sequence[int], *, where: str = "prune.layers") -> list[int]:
    """Remove the decoder layers ``indices`` (in place): renumber the rest, update the config; returns
    the kept original indices."""
    import torch

    family = family_of(model, where)
    blocks = decoder_layers(model, family)
    n = len(blocks)
    drop = sorted(set(int(i) for i in indices))
    if any(not 0 <= i < n for i in drop):
        _fail(where, f"layer indices must lie in 0..{n - 1}", drop)
    kept = [i for i in range(n) if i not in drop]
    if not kept:
        _fail(where, f"must leave at least one of the model's {n} layers", drop)
    new = torch.nn.ModuleList([blocks[i] for i in kept])
    for j, block in enumerate(new):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = j
    parent, _, attr = family.layers.rpartition(".")
    setattr(get_module(model, parent) if parent else model, attr, new)
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for key in family.per_layer:
        values = getattr(text, key, None)
        if isinstance(values, (list, tuple)) and len(values) == n:
            setattr(text, key, [values[i] for i in kept])
    _set_config(model, family.n_layers, len(kept))
    inner = get_module(model, parent) if parent else model
    if hasattr(inner, "has_sliding_layers") and getattr(text, "layer_types", None) is not None:
        inner.has_sliding_layers = "sliding_attention" in text.layer_types
    check_consistent(model, where)
    return kept


def drop_layers(model, importance: Sequence[float], *, drop=None, fraction=None,
                where: str = "prune.layers") -> list[int]:
    """Drop the ``drop`` (or ``fraction`` of the) layers of lowest ``importance`` (one value per layer,
    e.g. ``layer_importance(calib)``); returns the dropped original indices, ascending."""
    family = family_of(model, where)
    n = len(decoder_layers(model, family))
    if len(importance) != n:
        raise StageError(f"{where}: {len(importance)} importance values for a model with {n} layers (fix: calibrate "
                         "the model being pruned)")
    count = layers_to_drop(model, drop=drop, fraction=fraction, where=where)
    dropped = sorted(rank_lowest_first(importance)[:count])
    remove_layers(model, dropped, where=where)
    return dropped


def _top(scores, k: int):
    """Indices of the ``k`` highest ``scores``, ascending (the layer keeps its channel order)."""
    import torch

    return torch.sort(torch.topk(scores.double(), k, sorted=False).indices).values


def shrink_mlp(model, scores: Sequence, *, keep=None, fraction=None, multiple: int = MLP_MULTIPLE,
               where: str = "prune.mlp") -> int:
    """Cut every layer's MLP to the same intermediate size, keeping each layer's highest ``scores`` (one
    tensor per layer, e.g. ``mlp_channel_scores``); returns the new intermediate size."""
    family = family_of(model, where)
    blocks = decoder_layers(model, family)
    size = mlp_target(model, keep=keep, fraction=fraction, multiple=multiple, where=where)
    width = geometry(model.config, family)["intermediate"]
    if len(scores) != len(blocks) or any(s.shape != (width,) for s in scores):
        raise StageError(f"{where}: channel scores must be one [{width}] tensor per layer ({len(blocks)}), got "
                         f"{[tuple(s.shape) for s in scores]}")
    for block, s in zip(blocks, scores):
        idx = _top(s, size)
        _slice_linear(get_module(block, family.ffn("gate_proj")), rows=idx)
        _slice_linear(get_module(block, family.ffn("up_proj")), rows=idx)
        _slice_linear(get_module(block, family.ffn("down_proj")), cols=idx)
        mlp = get_module(block, family.mlp)
        if isinstance(getattr(mlp, "intermediate_size", None), int):
            mlp.intermediate_size = size
    _set_config(model, family.intermediate, size)
    check_consistent(model, where)
    return size


def remove_head_groups(model, scores: Sequence, *, keep=None, fraction=None, where: str = "prune.heads") -> int:
    """Keep the same number of GQA groups in every layer, each layer its highest ``scores`` (one tensor
    of one value per KV head per layer, e.g. ``head_group_scores``); returns the query heads kept."""
    import torch

    family = family_of(model, where)
    blocks = decoder_layers(model, family)
    geo = geometry(model.config, family)
    groups = groups_to_keep(model, keep=keep, fraction=fraction, where=where)
    if len(scores) != len(blocks) or any(s.shape != (geo["kv_heads"],) for s in scores):
        raise StageError(f"{where}: group scores must be one [{geo['kv_heads']}] tensor per layer ({len(blocks)}), "
                         f"got {[tuple(s.shape) for s in scores]}")
    for block, s in zip(blocks, scores):
        picks = [group_indices(int(g), geo["group"], geo["head_dim"]) for g in _top(s, groups)]
        q_rows = torch.tensor([r for q, _ in picks for r in q], dtype=torch.long)
        kv_rows = torch.tensor([r for _, kv in picks for r in kv], dtype=torch.long)
        for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            _slice_linear(get_module(block, family.attn(name)), rows=rows)
        _slice_linear(get_module(block, family.attn("o_proj")), cols=q_rows)
        attn = get_module(block, family.attention)
        for attr, value in (("num_heads", groups * geo["group"]), ("num_attention_heads", groups * geo["group"]),
                            ("num_key_value_heads", groups)):
            if isinstance(getattr(attn, attr, None), int):
                setattr(attn, attr, value)
    _set_config(model, family.head_dim, geo["head_dim"])  # explicit: never recomputed from hidden_size
    _set_config(model, family.n_heads, groups * geo["group"])
    _set_config(model, family.n_kv_heads, groups)
    check_consistent(model, where)
    return groups * geo["group"]


def shape_problems(model) -> list[str]:
    """Every disagreement between the model's config and its tensors (empty when consistent)."""
    family = family_of(model)
    geo = geometry(model.config, family)
    blocks = decoder_layers(model, family)
    hidden = model.get_input_embeddings().weight.shape[1]
    out = []
    if len(blocks) != geo["layers"]:
        out.append(f"{family.n_layers} = {geo['layers']} but the model has {len(blocks)} layers")
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for key in family.per_layer:
        values = getattr(text, key, None)
        if isinstance(values, (list, tuple)) and len(values) != len(blocks):
            out.append(f"{key} has {len(values)} entries for {len(blocks)} layers")
    q, kv, inter = geo["heads"] * geo["head_dim"], geo["kv_heads"] * geo["head_dim"], geo["intermediate"]
    want = {"q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q)}
    want = {family.attn(k): v for k, v in want.items()}
    want.update({family.ffn("gate_proj"): (inter, hidden), family.ffn("up_proj"): (inter, hidden),
                 family.ffn("down_proj"): (hidden, inter)})
    qkv = {family.attn(n) for n in ("q_proj", "k_proj", "v_proj")}
    for i, block in enumerate(blocks):
        for path, shape in want.items():
            linear = get_module(block, path)
            got = tuple(linear.weight.shape)
            if got != shape or (linear.out_features, linear.in_features) != shape:
                out.append(f"layer {i} {path}: weight {got}, config says {shape}")
            if linear.bias is None and family.qkv_bias and path in qkv:
                out.append(f"layer {i} {path}: no bias, which {family.name} always carries on q/k/v")
            if linear.bias is not None and tuple(linear.bias.shape) != (shape[0],):
                out.append(f"layer {i} {path}: bias {tuple(linear.bias.shape)}, config says ({shape[0]},)")
        idx = getattr(get_module(block, family.attention), "layer_idx", i)
        if idx != i:
            out.append(f"layer {i}: {family.attention}.layer_idx is {idx}")
    return out


def check_consistent(model, where: str = "prune") -> None:
    """StageError unless every config size agrees with the tensors (a pruning bug, not a user error)."""
    problems = shape_problems(model)
    if problems:
        raise StageError(f"{where}: the pruned model's config disagrees with its tensors: " + "; ".join(problems[:8]))


def parameter_count(model) -> int:
    """Parameters counted once each (a tied embedding and LM head are one tensor)."""
    return sum(p.numel() for p in model.parameters())
