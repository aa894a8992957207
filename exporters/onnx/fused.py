"""The fused decoder graph: onnxruntime's contrib kernels for attention, norms and quantised linears.

Why a second graph beside the standard-ops one (``export.DecoderGraph``): a 135M model's decode
step is dominated by per-op overhead and by bytes read, not by arithmetic. The standard graph
spends ~40 ops per layer on attention and norms and reads float32 weights; this one uses

- ``GroupQueryAttention`` (com.microsoft): packed QKV in, rotary embedding, causal/sliding-window
  mask, KV-cache concat and GQA head sharing in one kernel. It reads no ``position_ids``: the
  positions come from ``attention_mask`` (``seqlens_k = sum(mask) - 1``), right-padded rows only,
  which is how onnxruntime-genai feeds it;
- ``SimplifiedLayerNormalization`` and ``SkipSimplifiedLayerNormalization`` (RMSNorm, and
  residual-add + RMSNorm in one kernel);
- ``MatMulNBits`` (com.microsoft) for int8/int4 block-quantised linears, including the LM head
  (the largest matrix of a small model: 49152 x 576 on SmolLM2) unless told otherwise; with
  ``accuracy_level`` 4 the kernel quantises activations to int8 per block at run time and runs
  integer dot products;
- q/k/v fused into one matrix multiply, gate/up into another.

Export path, chosen for quality and speed (facts checked on this project's machines):

- optimum-onnx 0.1.0 (torch tracing) pins transformers below 4.58, which silently reads
  SmolLM2's rope_theta as 10000 from a transformers-5 config (an fp32 export made that way
  drifted to top-1 0.955); its graph is standard ops, and the usual next step,
  ``quantize_dynamic``, measured top-1 0.60 and ~23 decode tok/s (benchmarks/obvious_onnx.py);
- onnxruntime-genai 0.18's model builder emits this same kind of graph (GroupQueryAttention +
  MatMulNBits) but its quantiser is round-to-nearest: int4 block 32 measured top-1 0.81;
- torch.onnx (dynamo) follows every transformers modeling refactor.

So the graph is written here directly from the checkpoint's tensors, every hyper-parameter read
explicitly, with our own quantiser (``quant.py``: per-block scale search, optionally weighted by
the run's importance matrix), and every value is checked against transformers in the tests.
On the embedded model it decodes faster than llama.cpp Q4_0 at equal threads
(benchmarks/onnx_speed.py).
"""
from __future__ import annotations

import json

import numpy as np
from onnx import TensorProto

from toolchain.core.errors import PreflightError

from .config import OnnxExportConfig
from .families import DecoderSpec, DecoderWeights
from .graph import GraphBuilder
from .integer import integer_linear, quantize_per_channel
from .quant import quantize_blocks

INT64, INT32 = TensorProto.INT64, TensorProto.INT32
MS = "com.microsoft"


# GroupQueryAttention's CPU kernel (onnxruntime 1.32) refuses other shapes at run time
GQA_HEAD_DIM_MULTIPLE = 16  # "head_size shall be a multiple of 16"
GQA_ROTARY_MULTIPLE = 16  # "cos_cache dimension 1 must be <= head_size / 2 and a multiple of 8"
GELU_TANH_C, GELU_TANH_CUBIC = float(np.sqrt(2.0 / np.pi)), 0.044715  # gelu_pytorch_tanh's constants


def rope_caches(spec: DecoderSpec, theta: float, dtype, factor: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """GroupQueryAttention's cos/sin caches ``[max_positions, rotary / 2]`` (half-rotation layout;
    a cache narrower than ``head_dim / 2`` turns only the first ``rotary`` values of each head),
    computed in float32 as transformers does, then cast."""
    angles = spec.rope_angles(theta, factor)
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def gelu_tanh(g: GraphBuilder, x: str, const, name: str) -> str:
    """gelu_pytorch_tanh in standard ops: ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``;
    ``const(value)`` makes a constant in the activations' dtype."""
    cube = g.op("Mul", [x, g.op("Mul", [x, x], name=f"{name}/sq")], name=f"{name}/cube")
    inner = g.op("Add", [x, g.op("Mul", [cube, const(GELU_TANH_CUBIC)], name=f"{name}/cubic")], name=f"{name}/inner")
    t = g.op("Tanh", [g.op("Mul", [inner, const(GELU_TANH_C)], name=f"{name}/scaled")], name=f"{name}/tanh")
    half_x = g.op("Mul", [x, const(0.5)], name=f"{name}/half_x")
    return g.op("Mul", [half_x, g.op("Add", [t, const(1.0)], name=f"{name}/one_plus")], name=f"{name}/gelu")


def check(spec: DecoderSpec) -> None:
    """PreflightError for a model whose shapes GroupQueryAttention cannot run."""
    for what, value, multiple in (("head_dim", spec.head_dim, GQA_HEAD_DIM_MULTIPLE),
                                  ("rotary dimension (head_dim x partial_rotary_factor)", spec.rotary,
                                   GQA_ROTARY_MULTIPLE)):
        if value % multiple:
            raise PreflightError(f"onnx export: the fused graph's GroupQueryAttention needs the {what} to be a "
                                 f"multiple of {multiple}, got {value} (fix: `graph: standard` for this model)")


def finish_decoder(g: GraphBuilder, spec: DecoderSpec, cfg: OnnxExportConfig, logits: str, elem_type: int) -> GraphBuilder:
    """Declare the decoder's outputs (``logits``, ``present.{i}.key|value``) and record the
    effective config and export options in the model's metadata; shared by both graphs."""
    g.output(logits, elem_type, ["batch_size", "sequence_length", spec.vocab_size])
    present_shape = ["batch_size", spec.num_kv_heads, "total_sequence_length", spec.head_dim]
    for i in range(spec.num_layers):
        g.output(f"present.{i}.key", elem_type, present_shape)
        g.output(f"present.{i}.value", elem_type, present_shape)
    g.metadata["edgesmith.effective_config"] = json.dumps(spec.to_dict(), sort_keys=True)
    g.metadata["edgesmith.precision"] = cfg.precision
    g.metadata["edgesmith.export_config"] = json.dumps(cfg.to_dict(), sort_keys=True)
    return g


class FusedDecoderGraph:
    """Builds the fused decoder graph for one spec and export config.

    ``importance`` (from an importance matrix): linear name -> mean squared input per column,
    weighting the quantiser's per-block scale search (``quant.quantize_blocks``).
    ``activation_ranges`` (int8 with static activations): linear input name -> (min, max)
    measured on calibration data; see ``calibrate.py``.
    """

    def __init__(self, spec: DecoderSpec, cfg: OnnxExportConfig, activation_ranges: dict | None = None,
                 importance: dict | None = None):
        self.spec, self.cfg = spec, cfg
        self.float = cfg.spec.compute_elem_type
        self.np_float = np.float16 if self.float == TensorProto.FLOAT16 else np.float32
        self.g = GraphBuilder(f"{spec.model_type}_decoder_fused", cfg.opset)
        self.ranges = activation_ranges or {}
        self.importance = importance or {}  # linear name -> mean x^2 per input column (an importance matrix)
        self.quant_summary: dict[str, int] = {}
        self.ropes: dict[tuple[float, float], tuple[str, str]] = {}  # (theta, factor) -> (cos, sin) caches
        check(spec)

    # -- weights ------------------------------------------------------------------------------
    def _count(self, kernel: str) -> None:
        """Tally quantised linears by kernel, for the export manifest."""
        self.quant_summary[kernel] = self.quant_summary.get(kernel, 0) + 1

    def weight(self, name: str, array: np.ndarray) -> str:
        return self.g.initializer(name, np.asarray(array, dtype=self.cfg.spec.weight_dtype))

    def linear(self, x: str, w: np.ndarray, bias: np.ndarray | None, name: str, bits: int | None | str = "default") -> str:
        """``x @ w.T + bias`` with ``w`` in Hugging Face ``[out, in]`` layout, quantised to the
        precision's bits unless ``bits`` says otherwise (None: plain float)."""
        g, cfg = self.g, self.cfg
        bits = cfg.spec.bits if bits == "default" else bits
        if bits is not None and cfg.activations == "static" and name in self.ranges:
            y = self.static_int8_linear(x, w, name)
        elif bits == 8 and cfg.int8_kernel == "integer":
            y = integer_linear(g, x, w, name)
            self._count("MatMulInteger8")
        elif bits is not None:
            bq = quantize_blocks(w, bits, cfg.block_size, cfg.symmetric, self.np_float,
                                 importance=self.importance.get(name))
            ins = [x, g.initializer(f"{name}.qweight", bq.packed), g.initializer(f"{name}.scales", bq.scales.reshape(-1))]
            if bq.zero_points is not None:
                ins.append(g.initializer(f"{name}.zero_points", bq.zero_points.reshape(-1)))
            y = g.op("MatMulNBits", ins, name=name, domain=MS, K=bq.k, N=bq.n, bits=bits,
                     block_size=cfg.block_size, accuracy_level=cfg.accuracy_level)
            self._count(f"MatMulNBits{bits}")
        else:
            y = g.op("MatMul", [x, self.weight(f"{name}.weight", np.ascontiguousarray(w.T))], name=name)
        if bias is not None:
            y = g.op("Add", [y, self.g.initializer(f"{name}.bias", bias.astype(self.np_float))], name=f"{name}/bias")
        return y

    def static_int8_linear(self, x: str, w: np.ndarray, name: str) -> str:
        """Activations quantised with a fixed (calibrated) uint8 scale and zero point, int8 weights
        per output channel, integer matmul with the float rescale fused (MatMulIntegerToFloat)."""
        g = self.g
        lo, hi = self.ranges[name]
        lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
        a_scale = np.float32(max(hi - lo, 1e-8) / 255.0)
        a_zero = np.uint8(np.clip(np.round(-lo / a_scale), 0, 255))
        # 7-bit weights, as the integer kernel's: full-range uint8 activations times |w| <= 127 saturate the
        # int16 pair sums of x86 CPUs without VNNI (exporters/onnx/integer.py)
        wq, w_scale = quantize_per_channel(w)  # [in, out], [out]
        xq = g.op("QuantizeLinear", [x, g.const(a_scale, np.float32), g.const(a_zero, np.uint8)], name=f"{name}/quant_x")
        y = g.op("MatMulIntegerToFloat", [xq, g.initializer(f"{name}.qweight", wq),
                                          g.const(a_scale, np.float32), g.initializer(f"{name}.scales", w_scale),
                                          g.const(a_zero, np.uint8)], name=name, domain=MS)
        self._count("MatMulIntegerToFloat")
        return y

    # -- blocks -------------------------------------------------------------------------------
    def norm(self, x: str, w: np.ndarray, name: str) -> str:
        return self.g.op("SimplifiedLayerNormalization", [x, self.weight(f"{name}.weight", w)], name=name,
                         axis=-1, epsilon=self.spec.rms_norm_eps, stash_type=1)

    def skip_norm(self, x: str, residual: str, w: np.ndarray, name: str) -> tuple[str, str]:
        """(rms_norm(x + residual), x + residual) in one kernel."""
        normed, _, _, total = self.g.op("SkipSimplifiedLayerNormalization",
                                        [x, residual, self.weight(f"{name}.weight", w)], name=name,
                                        outputs=[name, "", "", f"{name}/sum"], domain=MS,
                                        epsilon=self.spec.rms_norm_eps)
        return normed, total

    def head_norm(self, x: str, w: np.ndarray, n: int, name: str) -> str:
        """RMSNorm over head_dim of each of the ``n`` heads in ``[batch, seq, n*head_dim]``."""
        g, d = self.g, self.spec.head_dim
        split = g.op("Reshape", [x, g.const([0, 0, n, d])], name=f"{name}/heads")
        return g.op("Reshape", [self.norm(split, w, name), g.const([0, 0, n * d])], name=f"{name}/flat")

    def rope(self, i: int) -> tuple[str, str]:
        """Layer ``i``'s cos/sin caches: ``rope.*`` for full layers, ``rope_local.*`` for sliding ones."""
        key = self.spec.rope(i)
        if key not in self.ropes:
            prefix = "rope" if key == (self.spec.rope_theta, self.spec.rope_scaling_factor) else "rope_local"
            cos, sin = rope_caches(self.spec, key[0], self.np_float, key[1])
            self.ropes[key] = (self.g.initializer(f"{prefix}.cos_cache", cos),
                               self.g.initializer(f"{prefix}.sin_cache", sin))
        return self.ropes[key]

    def attention(self, x: str, layer, i: int, past_k: str, past_v: str) -> str:
        g, s = self.g, self.spec
        name = f"layers.{i}/attn"
        qkv_w = np.concatenate([layer.q, layer.k, layer.v], axis=0)
        qkv_b = None
        if "q" in layer.bias:
            qkv_b = np.concatenate([layer.bias["q"], layer.bias["k"], layer.bias["v"]])
        qkv = self.linear(x, qkv_w, qkv_b, f"{name}/qkv")
        qkv_in = [qkv, None, None]  # packed
        if layer.q_norm is not None:  # per-head q/k norms come before the kernel's rotary: unpack (Gemma3)
            q_out, kv_out = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
            q, k, v = g.op("Split", [qkv, g.const([q_out, kv_out, kv_out])], name=f"{name}/split", outputs=3, axis=-1)
            qkv_in = [self.head_norm(q, layer.q_norm, s.num_heads, f"{name}/q_norm"),
                      self.head_norm(k, layer.k_norm, s.num_kv_heads, f"{name}/k_norm"), v]
        cos, sin = self.rope(i)
        window = s.window(i)
        attn = g.op("GroupQueryAttention",
                    [*qkv_in, past_k, past_v, self.seqlens_k, self.total_len, cos, sin],
                    name=f"{name}/gqa", outputs=[f"{name}/gqa", f"present.{i}.key", f"present.{i}.value"],
                    domain=MS, num_heads=s.num_heads, kv_num_heads=s.num_kv_heads, do_rotary=1,
                    rotary_interleaved=0, scale=s.attention_scale,
                    local_window_size=-1 if window is None else int(window))[0]
        return self.linear(attn, layer.o, layer.bias.get("o"), f"{name}/o")

    def activation(self, x: str, name: str) -> str:
        g = self.g
        if self.spec.hidden_act == "silu":
            return g.op("Mul", [x, g.op("Sigmoid", [x], name=f"{name}/sigmoid")], name=f"{name}/silu")
        if self.float == TensorProto.FLOAT:  # onnxruntime's CPU FastGelu (the tanh form) is float32 only
            return g.op("FastGelu", [x], name=f"{name}/gelu", domain=MS)
        return gelu_tanh(g, x, lambda v: g.const(v, self.np_float), name)

    def mlp(self, x: str, layer, i: int) -> str:
        g, name, f = self.g, f"layers.{i}/mlp", self.spec.intermediate_size
        gate_up_b = None
        if "gate" in layer.bias:
            gate_up_b = np.concatenate([layer.bias["gate"], layer.bias["up"]])
        gate_up = self.linear(x, np.concatenate([layer.gate, layer.up], axis=0), gate_up_b, f"{name}/gate_up")
        gate, up = g.op("Split", [gate_up, g.const([f, f])], name=f"{name}/split", outputs=2, axis=-1)
        gated = g.op("Mul", [self.activation(gate, name), up], name=f"{name}/gated")
        return self.linear(gated, layer.down, layer.bias.get("down"), f"{name}/down")

    def embed(self, input_ids: str, table: np.ndarray) -> str:
        g, cfg = self.g, self.cfg
        if cfg.quantize_embedding and cfg.spec.bits is not None:
            bq = quantize_blocks(table, cfg.spec.bits, cfg.block_size, cfg.symmetric, self.np_float)
            ins = [g.initializer("model.embed_tokens.qweight", bq.packed_2d()), input_ids,
                   g.initializer("model.embed_tokens.scales", bq.scales)]
            if bq.zero_points is not None:
                ins.append(g.initializer("model.embed_tokens.zero_points", bq.zero_points))
            return g.op("GatherBlockQuantized", ins, name="embed", domain=MS, gather_axis=0, quantize_axis=1,
                        block_size=cfg.block_size, bits=cfg.spec.bits)
        return g.op("Gather", [self.weight("model.embed_tokens.weight", table), input_ids], name="embed")

    def lm_head(self, x: str, weights: DecoderWeights, out: str) -> str:
        w = weights.embed if weights.lm_head is None else weights.lm_head
        bits = self.cfg.lm_head_bits
        if bits is not None:
            logits = self.linear(x, w, None, "lm_head", bits=bits)
            return self.g.op("Identity", [logits], outputs=[out])
        # plain float: MatMul on a transposed copy ([hidden, vocab]) beats Gemm(transB) + reshapes
        return self.g.op("MatMul", [x, self.weight("lm_head.weight", np.ascontiguousarray(w.T))], outputs=[out])

    def softcap(self, x: str, cap: float, out: str) -> str:
        """``tanh(x / cap) * cap`` (Gemma's final logit soft-capping)."""
        g, c = self.g, self.g.const(cap, self.np_float)
        return g.op("Mul", [g.op("Tanh", [g.op("Div", [x, c], name="softcap/div")], name="softcap/tanh"), c],
                    outputs=[out])

    # -- whole graph --------------------------------------------------------------------------
    def build(self, weights: DecoderWeights) -> GraphBuilder:
        g, s, f = self.g, self.spec, self.float
        input_ids = g.input("input_ids", INT64, ["batch_size", "sequence_length"])
        attention_mask = g.input("attention_mask", INT64, ["batch_size", "total_sequence_length"])
        past_shape = ["batch_size", s.num_kv_heads, "past_sequence_length", s.head_dim]
        past = [(g.input(f"past_key_values.{i}.key", f, past_shape),
                 g.input(f"past_key_values.{i}.value", f, past_shape)) for i in range(s.num_layers)]

        # GroupQueryAttention's lengths: per row, the index of the last real token; the total width
        lengths = g.op("ReduceSum", [attention_mask, g.const([1])], name="lengths", keepdims=0)
        self.seqlens_k = g.op("Cast", [g.op("Sub", [lengths, g.const(1)], name="seqlens_k64")], name="seqlens_k", to=INT32)
        total = g.op("Shape", [attention_mask], name="total_len64", start=1, end=2)
        self.total_len = g.op("Cast", [g.op("Squeeze", [total, g.const([0])], name="total_len_scalar")],
                              name="total_len", to=INT32)

        h = self.embed(input_ids, weights.embed)
        if s.embedding_scale is not None:  # in the weights' dtype, as transformers casts it
            h = g.op("Mul", [h, g.const(s.embedding_scale, self.np_float)], name="embed/scaled")
        normed = self.norm(h, weights.layers[0].input_norm, "layers.0/input_norm")
        for i, layer in enumerate(weights.layers):
            attn = self.attention(normed, layer, i, *past[i])
            if layer.attn_out_norm is not None:  # on the branch, before the residual add (Gemma3)
                attn = self.norm(attn, layer.attn_out_norm, f"layers.{i}/attn_out_norm")
            normed, h = self.skip_norm(attn, h, layer.post_attention_norm, f"layers.{i}/post_attention_norm")
            mlp = self.mlp(normed, layer, i)
            if layer.mlp_out_norm is not None:
                mlp = self.norm(mlp, layer.mlp_out_norm, f"layers.{i}/mlp_out_norm")
            last = i + 1 == len(weights.layers)
            next_w = weights.norm if last else weights.layers[i + 1].input_norm
            normed, h = self.skip_norm(mlp, h, next_w, "norm" if last else f"layers.{i + 1}/input_norm")
        cap = s.final_logit_softcapping
        logits = self.lm_head(normed, weights, "logits" if cap is None else "lm_head/logits")
        if cap is not None:
            logits = self.softcap(logits, cap, "logits")

        return finish_decoder(g, s, self.cfg, logits, f)
