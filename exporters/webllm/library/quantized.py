"""Group-quantised Linear and Embedding modules for the WebLLM model library.

The parameters keep mlc-llm's group quantisation layout ("NK"), so weights written for
mlc-llm's own library load unchanged:

    ``{name}.q_weight``  uint32  [out, ceil(in / group) * group / per_storage]
    ``{name}.q_scale``   model dtype [out, ceil(in / group)]
    ``{name}.bias``      model dtype [out]            (only when the layer has a bias)

Element ``k`` of row ``n`` sits in word ``k // per_storage`` at bit ``bits * (k % per_storage)``;
its value is ``(nibble - max_int) * scale[n, k // group]``.

The dequantisation and the matmul are written as one tensor expression (two blocks in one
PrimFunc), the form dlight's GPU GEMV / matmul rules schedule with the dequantisation inlined,
so the full-precision weight is never written to memory.
"""

from __future__ import annotations

from typing import Any

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op


def _ceildiv(a: int, b: int) -> int:
    return -(-a // b)


class QuantLayout:
    """Numbers of one group-quantisation spec, read from the shared QUANTS table entry."""

    def __init__(self, spec: Any) -> None:
        self.model_dtype = str(spec.model_dtype)
        self.bits = int(spec.bits)
        self.group_size = int(spec.group_size)
        self.storage_dtype = str(spec.storage_dtype)
        self.per_storage = int(spec.elems_per_storage)
        self.max_int = int(spec.max_int)

    def num_groups(self, in_features: int) -> int:
        return _ceildiv(in_features, self.group_size)

    def num_words(self, in_features: int) -> int:
        return self.num_groups(in_features) * self.group_size // self.per_storage

    def element(self, q_weight: te.Tensor, q_scale: te.Tensor, row, col, dtype: str):
        """The dequantised weight[row, col] as a TIR expression of ``dtype``."""
        word = q_weight[row, col // self.per_storage]
        shift = (col % self.per_storage).astype(self.storage_dtype) * tirx.const(
            self.bits, self.storage_dtype
        )
        mask = tirx.const((1 << self.bits) - 1, self.storage_dtype)
        nibble = tirx.bitwise_and(tirx.shift_right(word, shift), mask)
        value = nibble.astype(self.model_dtype) - tirx.const(self.max_int, self.model_dtype)
        value = value * q_scale[row, col // self.group_size]
        return value if dtype == self.model_dtype else value.astype(dtype)


def _dequant_matmul(layout: QuantLayout, out_dtype: str, has_bias: bool):
    """TE builder: y[..., n] = sum_k x[..., k] * W[n, k] (+ bias[n]) with W dequantised."""

    def build(x: te.Tensor, q_weight: te.Tensor, q_scale: te.Tensor, *bias: te.Tensor):
        out_features = q_weight.shape[0]
        in_features = x.shape[-1]
        weight = te.compute(
            (out_features, in_features),
            lambda n, k: layout.element(q_weight, q_scale, n, k, layout.model_dtype),
            name="dequantize",
        )
        k = te.reduce_axis((0, in_features), name="k")
        lead = list(x.shape[:-1])

        def _matmul(*idx):
            *outer, n = idx
            lhs = x(*outer, k)
            rhs = weight[n, k]
            if out_dtype != layout.model_dtype:
                lhs, rhs = lhs.astype(out_dtype), rhs.astype(out_dtype)
            return te.sum(lhs * rhs, axis=k)

        out = te.compute((*lead, out_features), _matmul, name="matmul")
        if has_bias:
            out = te.compute(
                out.shape, lambda *idx: out(*idx) + bias[0][idx[-1]].astype(out_dtype), name="bias"
            )
        return out

    return build


class GroupQuantLinear(nn.Module):
    """A bias-optional linear layer whose weight is stored group-quantised (NK layout)."""

    def __init__(self, in_features: int, out_features: int, spec: Any, bias: bool = False,
                 out_dtype: str | None = None) -> None:
        super().__init__()
        self.layout = QuantLayout(spec)
        self.in_features = in_features
        self.out_features = out_features
        self.out_dtype = out_dtype or self.layout.model_dtype
        self.q_weight = nn.Parameter(
            (out_features, self.layout.num_words(in_features)), self.layout.storage_dtype
        )
        self.q_scale = nn.Parameter(
            (out_features, self.layout.num_groups(in_features)), self.layout.model_dtype
        )
        self.bias = nn.Parameter((out_features,), self.layout.model_dtype) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        args = [x, self.q_weight, self.q_scale] + ([self.bias] if self.bias is not None else [])
        return op.tensor_expr_op(
            _dequant_matmul(self.layout, self.out_dtype, self.bias is not None),
            name_hint="dequantize_matmul",
            args=args,
        )


class GroupQuantEmbedding(nn.Module):
    """An embedding table stored group-quantised along the hidden dimension."""

    def __init__(self, num: int, dim: int, spec: Any) -> None:
        super().__init__()
        self.layout = QuantLayout(spec)
        self.num = num
        self.dim = dim
        self.q_weight = nn.Parameter((num, self.layout.num_words(dim)), self.layout.storage_dtype)
        self.q_scale = nn.Parameter((num, self.layout.num_groups(dim)), self.layout.model_dtype)

    def forward(self, ids: Tensor) -> Tensor:
        layout, dim = self.layout, self.dim

        def _take(q_weight: te.Tensor, q_scale: te.Tensor, ids: te.Tensor):
            return te.compute(
                (*ids.shape, dim),
                lambda *idx: layout.element(
                    q_weight, q_scale, ids(*idx[:-1]), idx[-1], layout.model_dtype
                ),
                name="dequantize_take",
            )

        return op.tensor_expr_op(
            _take, name_hint="dequantize_take", args=[self.q_weight, self.q_scale, ids]
        )

    def lm_head_forward(self, x: Tensor) -> Tensor:
        """Logits through the transposed (tied) table, accumulated in float32."""
        return op.tensor_expr_op(
            _dequant_matmul(self.layout, "float32", False),
            name_hint="dequantize_lm_head",
            args=[x, self.q_weight, self.q_scale],
        )


class TiedEmbedding(nn.Embedding):
    """The full-precision embedding whose transpose can serve as the lm_head."""

    def lm_head_forward(self, x: Tensor) -> Tensor:
        return op.matmul(x, op.permute_dims(self.weight), out_dtype="float32")
