"""Typed configuration of the ONNX exporter, validated when it is built."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from onnx import TensorProto


@dataclass(frozen=True)
class Precision:
    """How one precision stores weights and computes activations in the exported graph."""

    name: str
    weight_dtype: type  # numpy dtype of stored float weights
    compute_elem_type: int  # ONNX element type of activations, logits and the KV cache
    mask_value: float  # large finite negative used to mask attention (never -inf: NaN on empty rows)
    summary: str


# fp16 / int8 / int4 are added here when their writers exist; `precision` accepts only these keys.
PRECISIONS: dict[str, Precision] = {
    "fp32": Precision("fp32", np.float32, TensorProto.FLOAT, float(np.finfo(np.float32).min),
                      "float32 weights and activations: the reference export"),
}

# The graph uses standard ops only. Opset 17 is what onnxruntime-web and transformers.js run;
# later opsets only change how ReduceMean takes its axes, which the graph builder handles.
MIN_OPSET = 17
MAX_OPSET = 21


@dataclass(frozen=True)
class OnnxExportConfig:
    precision: str = "fp32"
    opset: int = 17

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            choices = ", ".join(repr(p) for p in PRECISIONS)
            raise ValueError(f"`precision` must be one of {choices}, got {self.precision!r}")
        if isinstance(self.opset, bool) or not isinstance(self.opset, int) or not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise ValueError(f"`opset` must be an integer from {MIN_OPSET} to {MAX_OPSET}, got {self.opset!r}")

    @property
    def spec(self) -> Precision:
        return PRECISIONS[self.precision]

    @classmethod
    def coerce(cls, value: "OnnxExportConfig | dict | None") -> "OnnxExportConfig":
        """Accept a config, a plain dict from a recipe, or None (defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - {"precision", "opset"})
            if unknown:
                raise ValueError(f"unknown ONNX export option(s) {', '.join(map(repr, unknown))}; "
                                 f"known: 'precision', 'opset'")
            return cls(**value)
        raise TypeError(f"ONNX export config must be an OnnxExportConfig, a dict or None, got {type(value).__name__}")

    def to_dict(self) -> dict:
        return asdict(self)
