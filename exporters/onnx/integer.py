"""int8 linears from standard ONNX integer ops: ``DynamicQuantizeLinear`` + ``MatMulInteger``.

What onnxruntime's ``quantize_dynamic`` writes and transformers.js' ``q8`` (``model_quantized.onnx``)
files use. onnxruntime-web 1.22 has no 8-bit ``MatMulNBits`` kernel but runs ``MatMulInteger``
with its wasm SIMD integer GEMM, so this is the 8-bit form a browser bundle can carry.

- weights: int8, symmetric, one scale per output channel (``|w|max / 127``), stored ``[in, out]``;
- activations: uint8 with a scale and zero point computed per tensor at run time;
- ``y = float(MatMulInteger(xq, wq, x_zero)) * (x_scale * w_scale)``.
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
    xq, x_scale, x_zero = g.op("DynamicQuantizeLinear", [x], name=f"{name}/quant_x", outputs=3)
    acc = g.op("MatMulInteger", [xq, g.initializer(f"{name}.qweight", wq), x_zero], name=f"{name}/matmul")
    acc = g.op("Cast", [acc], name=f"{name}/to_float", to=TensorProto.FLOAT)
    both = g.op("Mul", [x_scale, g.initializer(f"{name}.scales", scale)], name=f"{name}/scale")
    return g.op("Mul", [acc, both], name=name)
