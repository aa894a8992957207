"""MLC quantisation schemes and the NumPy group-quantisation codec.

The names are mlc-llm's: ``q<bits>f<model float bits>[_<variant>]``; ``q0`` = no quantisation,
``_1`` = group quantisation in the "NK" layout (the packed axis is the input axis of an ``[out, in]``
weight, so a record keeps the Hugging Face row order).

Group quantisation, as mlc-llm's ``GroupQuantize`` computes it (``quantize_weight`` with
``axis=-1``; every step in the model dtype, i.e. float16 arithmetic for ``q4f16_1``):

1. the source weight is first cast to the model dtype (mlc's loader does ``.astype(dtype)``);
2. per group of ``group_size`` consecutive input elements: ``scale = max|w| / max_int``
   (``max_int = 2**(bits-1) - 1 = 7``); a trailing group shorter than ``group_size`` (``in`` not
   a multiple of 32) uses only its real elements;
3. ``q = min(max(round(w / scale + max_int), 0), 2 * max_int)``, round half to even (LLVM's
   ``nearbyint``, what TVM lowers ``round`` to on the CPU), a NaN from an all-zero group
   (0 / 0) ending as 0;
4. ``q`` is packed ``elems_per_storage = 32 / bits = 8`` to a uint32, element ``j`` of a word in
   bits ``[bits*j, bits*(j+1))`` (the first element in the lowest nibble); the packed row holds
   ``ceil(in / group_size) * group_size / 8`` words, the padding nibbles are 0;
5. dequantisation: ``w' = (q - max_int) * scale``, computed in the model dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NO_QUANT, GROUP_QUANT = "no-quant", "group-quant"  # mlc-llm's `kind` strings
LAYOUT_NK = "NK"  # weight [out, in], groups along `in` (mlc-llm's linear_weight_layout)
STORAGE_BITS = {"uint32": 32}


@dataclass(frozen=True)
class QuantSpec:
    """One MLC quantisation scheme (the fields mirror mlc-llm's NoQuantize / GroupQuantize)."""

    name: str
    kind: str  # NO_QUANT | GROUP_QUANT
    model_dtype: str  # "float32" | "float16": activations, norms, biases, scales
    bits: int = 0  # quantised element width (group-quant only)
    group_size: int = 0  # elements per scale, along the input axis
    storage_dtype: str = ""  # packed word type
    layout: str = ""  # LAYOUT_NK
    quantize_embedding: bool = False
    quantize_final_fc: bool = False  # lm_head

    @property
    def is_group(self) -> bool:
        return self.kind == GROUP_QUANT

    @property
    def elems_per_storage(self) -> int:
        return STORAGE_BITS[self.storage_dtype] // self.bits if self.is_group else 0

    @property
    def storage_per_group(self) -> int:
        return self.group_size // self.elems_per_storage if self.is_group else 0

    @property
    def max_int(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.is_group else 0

    @property
    def np_model_dtype(self) -> np.dtype:
        return np.dtype(self.model_dtype)

    def num_groups(self, in_features: int) -> int:
        return -(-in_features // self.group_size)

    def q_weight_shape(self, out_features: int, in_features: int) -> tuple[int, int]:
        return out_features, self.num_groups(in_features) * self.storage_per_group

    def q_scale_shape(self, out_features: int, in_features: int) -> tuple[int, int]:
        return out_features, self.num_groups(in_features)


def _group(name: str, model_dtype: str) -> QuantSpec:
    return QuantSpec(name=name, kind=GROUP_QUANT, model_dtype=model_dtype, bits=4, group_size=32,
                     storage_dtype="uint32", layout=LAYOUT_NK, quantize_embedding=True, quantize_final_fc=True)


QUANTS: dict[str, QuantSpec] = {
    "q0f32": QuantSpec("q0f32", NO_QUANT, "float32"),
    "q0f16": QuantSpec("q0f16", NO_QUANT, "float16"),
    "q4f32_1": _group("q4f32_1", "float32"),
    "q4f16_1": _group("q4f16_1", "float16"),
}


def quant_spec(name: str) -> QuantSpec:
    """The spec for ``name``; ValueError naming the known schemes otherwise."""
    try:
        return QUANTS[name]
    except KeyError:
        raise ValueError(f"unknown MLC quantisation {name!r}; known: {', '.join(map(repr, QUANTS))}") from None


def _check_2d(w: np.ndarray, what: str) -> None:
    if w.ndim != 2:
        raise ValueError(f"{what} must be 2-D [out, in], got shape {w.shape}")


def quantize_group(w: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """Group-quantise a ``[out, in]`` weight: ``(q_weight uint32 [out, words], q_scale [out, groups])``.

    Bit-for-bit mlc-llm's CPU result (see the module docstring for the order of operations).
    """
    if not spec.is_group:
        raise ValueError(f"{spec.name} is not a group quantisation")
    _check_2d(w, "weight")
    dt = spec.np_model_dtype
    out_f, in_f = w.shape
    groups, g = spec.num_groups(in_f), spec.group_size
    wm = np.asarray(w).astype(dt)  # step 1: the loader's cast to the model dtype
    padded = np.zeros((out_f, groups * g), dtype=dt)
    padded[:, :in_f] = wm
    blocks = padded.reshape(out_f, groups, g)
    max_int = dt.type(spec.max_int)
    with np.errstate(divide="ignore", invalid="ignore"):
        # padding is 0, never above a real |w|, so the max over the padded group is the real one
        scale = (np.abs(blocks).max(axis=2) / max_int).astype(dt)
        x = (blocks / scale[:, :, None]).astype(dt)
        x = (x + max_int).astype(dt)
    x = np.rint(x)  # round half to even
    x = np.where(np.isnan(x), dt.type(0), x)  # TIR max(NaN, 0) selects 0
    x = np.minimum(np.maximum(x, dt.type(0)), dt.type(2 * spec.max_int))
    q = x.astype(np.uint32).reshape(out_f, groups * g)
    q[:, in_f:] = 0  # padding nibbles are zero, not max_int
    words = q.reshape(out_f, -1, spec.elems_per_storage)
    shifts = (np.arange(spec.elems_per_storage, dtype=np.uint32) * np.uint32(spec.bits))
    packed = np.bitwise_or.reduce(words << shifts, axis=2).astype(np.uint32)
    return packed, scale


def unpack_group(q_weight: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """The raw integers ``[out, words * elems_per_storage]`` (uint8) of a packed weight."""
    _check_2d(q_weight, "q_weight")
    shifts = np.arange(spec.elems_per_storage, dtype=np.uint32) * np.uint32(spec.bits)
    mask = np.uint32((1 << spec.bits) - 1)
    vals = (q_weight.astype(np.uint32)[:, :, None] >> shifts) & mask
    return vals.reshape(q_weight.shape[0], -1).astype(np.uint8)


def dequantize_group(q_weight: np.ndarray, q_scale: np.ndarray, spec: QuantSpec,
                     in_features: int | None = None) -> np.ndarray:
    """``(q - max_int) * scale`` in the model dtype, returned as float32 ``[out, in_features]``.

    ``in_features`` defaults to the padded width (``words * elems_per_storage``).
    """
    if not spec.is_group:
        raise ValueError(f"{spec.name} is not a group quantisation")
    dt = spec.np_model_dtype
    q = unpack_group(q_weight, spec)
    width = q.shape[1] if in_features is None else in_features
    if width > q.shape[1] or spec.num_groups(width) != q_scale.shape[1]:
        raise ValueError(f"q_weight {q_weight.shape} / q_scale {q_scale.shape} do not fit in_features={width}")
    q = q[:, :width].astype(np.float32) - np.float32(spec.max_int)
    scale = np.repeat(q_scale.astype(np.float32), spec.group_size, axis=1)[:, :width]
    # (q - 7) has 4 bits, scale 11 or 24: the float32 product rounded once to the model dtype equals
    # the model-dtype multiply
    return (q * scale).astype(dt).astype(np.float32)
