"""int8 linears from standard ONNX integer ops: ``DynamicQuantizeLinear`` + ``MatMulInteger``.

What onnxruntime's ``quantize_dynamic`` writes and transformers.js' ``q8`` (``model_quantized.onnx``)
files use. onnxruntime-web 1.22 has no 8-bit ``MatMulNBits`` kernel but runs ``MatMulInteger``
with its wasm SIMD integer GEMM, so this is the 8-bit form a browser bundle can carry.

- weights: int8, symmetric, one scale per output channel (``|w|max / 127``), stored ``[in, out]``;
- activations: int8, symmetric, one scale per token computed at run time (``|x|max / 127`` over
  the row, from ReduceMax/Div/Round/Clip/Cast). Not ``DynamicQuantizeLinear``'s one scale for the
  whole tensor: a prompt's few outlier tokens (SmolLM2's first token carries activations ~100x the
  others) then flatten every other token to a handful of levels, measured on the fine-tuned
  quickstart model at KL 0.59 and top-1 0.59 (what onnxruntime's quantize_dynamic gives too);
- ``y = float(MatMulInteger(xq + 128, wq, zero point 128)) * x_scale * w_scale``.
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto


def quantize_per_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``w`` ``[out, in]`` -> (int8 ``[in, out]``, float32 scales ``[out]``)."""
    w = np.asarray(w, dtype=np.float32)
    scale = (np.maximum(np.abs(w).max(axis=1), 1e-8) / 127.0).astype(np.float32)
    q = np.clip(np.round(w / scale[:, None]), -127, 127).astype(np.int8)
    return np.ascontiguousarray(q.T), scale


def integer_linear(g, x: str, w: np.ndarray, name: str) -> str:
    """``x @ w.T`` (float32 ``x``) through int8 integer ops; returns the float32 output name."""
    wq, scale = quantize_per_channel(w)
    f32 = lambda v: g.const(v, np.float32)  # noqa: E731
    absmax = g.reduce("ReduceMax", g.op("Abs", [x], name=f"{name}/abs"), [-1], name=f"{name}/absmax")
    x_scale = g.op("Div", [g.op("Max", [absmax, f32(1e-8)], name=f"{name}/nonzero"), f32(127.0)],
                   name=f"{name}/x_scale")
    q = g.op("Round", [g.op("Div", [x, x_scale], name=f"{name}/scaled")], name=f"{name}/round")
    # symmetric int8 levels shifted into uint8 around a zero point of 128 (one for every row, so a
    # scalar): uint8 x int8 is the integer GEMM onnxruntime (MLAS) and onnxruntime-web have fast
    # kernels for; int8 x int8 was measured 13x slower natively
    q = g.op("Clip", [g.op("Add", [q, f32(128.0)], name=f"{name}/shift"), f32(1.0), f32(255.0)], name=f"{name}/clip")
    xq = g.op("Cast", [q], name=f"{name}/quant_x", to=TensorProto.UINT8)
    zero = g.const(128, np.uint8)
    acc = g.op("MatMulInteger", [xq, g.initializer(f"{name}.qweight", wq), zero], name=f"{name}/matmul")
    acc = g.op("Cast", [acc], name=f"{name}/to_float", to=TensorProto.FLOAT)
    acc = g.op("Mul", [acc, x_scale], name=f"{name}/rescale_x")
    return g.op("Mul", [acc, g.initializer(f"{name}.scales", scale)], name=name)
