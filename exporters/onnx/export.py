"""ONNX export of a Llama-style decoder with a KV cache, written op by op.

The graph is built by hand from the checkpoint's tensors rather than traced with torch.onnx or
optimum, because:

- we control every op and layout: standard ONNX ops only (opset 17 by default), so the same file
  runs in onnxruntime and onnxruntime-web, with the input/output names transformers.js and
  optimum use (``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key``
  -> ``logits``, ``present.{i}.key``), and later precisions can swap single ops;
- there is no coupling to the installed transformers version (optimum-onnx pins transformers
  below 4.58, and tracing changes with every modeling refactor);
- it is fast and light: no tracing, weights streamed once into the external-data file;
- every hyper-parameter is read explicitly and recorded. A transformers-5 config keeps
  ``rope_theta`` under ``rope_parameters``; an exporter reading the old key silently used 10000
  instead of SmolLM2's 100000 and the model drifted (DESIGN.md). Here the effective values go
  into the manifest and the model's metadata, and the tests compare logits with transformers.

Math (as transformers' LlamaForCausalLM): RMSNorm in float32; rotary embeddings with the
``rotate_half`` convention from cos/sin tables gathered by ``position_ids``; grouped-query
attention (query heads grouped per KV head by a broadcasting MatMul, equivalent to repeating
the KV heads without copying them); a causal mask at absolute query positions
``past_len + i`` combined with ``attention_mask`` padding (and Mistral's sliding window);
SwiGLU MLP; final norm; lm_head (a ``Gemm(transB=1)`` on the embedding matrix when tied).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from exporters.hf import read_config
from toolchain.errors import PreflightError

from .config import OnnxExportConfig
from .families import DecoderSpec, DecoderWeights, family_for
from .graph import GraphBuilder

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx_data"
# copied beside the model when present: every target carries its tokenizer and chat template
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja")
INT64 = TensorProto.INT64


def _config(config: OnnxExportConfig | dict | None) -> OnnxExportConfig:
    try:
        return OnnxExportConfig.coerce(config)
    except (ValueError, TypeError) as e:
        raise PreflightError(f"onnx export config: {e}") from None


def preflight(model_dir: str | Path, config: OnnxExportConfig | dict | None = None) -> None:
    """Refuse, before any work, a model architecture or setting this exporter cannot handle."""
    _config(config)
    hf_config = read_config(model_dir)
    family_for(hf_config.get("model_type")).read_spec(hf_config)


def export(model_dir: str | Path, out_dir: str | Path, config: OnnxExportConfig | dict | None = None) -> dict:
    """Write ``model.onnx`` + ``model.onnx_data`` and the tokenizer files into ``out_dir``.

    Returns the export's manifest: format, precision, opset, files, effective config, graph summary.
    """
    cfg = _config(config)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    preflight(model_dir, cfg)
    hf_config = read_config(model_dir)
    family = family_for(hf_config["model_type"])
    spec = family.read_spec(hf_config)
    weights = family.load_weights(model_dir, spec)
    graph = DecoderGraph(spec, cfg).build(weights)
    del weights

    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomically(graph, out_dir)
    copied = [name for name in SIDE_FILES if (model_dir / name).is_file()]
    for name in copied:
        shutil.copy2(model_dir / name, out_dir / name)
    return {
        "format": "onnx",
        "precision": cfg.precision,
        "opset": cfg.opset,
        "files": sorted([MODEL_FILE, DATA_FILE, *copied]),
        "effective_config": spec.to_dict(),
        "graph": {
            "nodes": len(graph.nodes),
            "initializers": len(graph.initializers),
            "inputs": [v.name for v in graph.inputs],
            "outputs": [v.name for v in graph.outputs],
        },
    }


def _write_atomically(graph: GraphBuilder, out_dir: Path) -> None:
    """Save and check in a temporary folder inside ``out_dir``, then move the pair into place."""
    tmp = Path(tempfile.mkdtemp(prefix=".onnx-export-", dir=out_dir))
    try:
        graph.save(tmp / MODEL_FILE, DATA_FILE)
        onnx.checker.check_model(str(tmp / MODEL_FILE))
        (out_dir / MODEL_FILE).unlink(missing_ok=True)  # never pair an old graph with new weights
        os.replace(tmp / DATA_FILE, out_dir / DATA_FILE)
        os.replace(tmp / MODEL_FILE, out_dir / MODEL_FILE)  # last: its presence means complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def rope_tables(spec: DecoderSpec) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin ``[max_positions, head_dim]``, computed in float32 as transformers does."""
    d = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
    freqs = np.arange(spec.max_positions, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


class DecoderGraph:
    """Builds the decoder graph for one spec and export config."""

    def __init__(self, spec: DecoderSpec, cfg: OnnxExportConfig):
        self.spec, self.cfg = spec, cfg
        self.float = cfg.spec.compute_elem_type
        self.g = GraphBuilder(f"{spec.model_type}_decoder", cfg.opset)

    def weight(self, name: str, array: np.ndarray) -> str:
        return self.g.initializer(name, np.asarray(array, dtype=self.cfg.spec.weight_dtype))

    def fconst(self, value) -> str:
        return self.g.const(value, self.cfg.spec.weight_dtype)

    # -- building blocks ----------------------------------------------------------------------
    def linear(self, x: str, w: np.ndarray, bias: np.ndarray | None, name: str) -> str:
        """``x @ w.T + bias`` with ``w`` in Hugging Face ``[out, in]`` layout, stored ``[in, out]``."""
        y = self.g.op("MatMul", [x, self.weight(f"{name}.weight", np.ascontiguousarray(w.T))], name=name)
        if bias is not None:
            y = self.g.op("Add", [y, self.weight(f"{name}.bias", bias)], name=f"{name}/bias")
        return y

    def rms_norm(self, x: str, w: np.ndarray, name: str) -> str:
        """``x / sqrt(mean(x^2) + eps) * w``, in the Pow/ReduceMean/Add/Sqrt/Div/Mul form that
        onnxruntime fuses into one SimplifiedLayerNormalization kernel."""
        g = self.g
        square = g.op("Pow", [x, self.fconst(2.0)], name=f"{name}/sq")
        mean_sq = g.reduce_mean(square, [-1], name=f"{name}/mean")
        std = g.op("Sqrt", [g.op("Add", [mean_sq, self.fconst(self.spec.rms_norm_eps)], name=f"{name}/eps")],
                   name=f"{name}/std")
        normed = g.op("Div", [x, std], name=f"{name}/normed")
        return g.op("Mul", [normed, self.weight(f"{name}.weight", w)], name=name)

    def rotary(self, x: str, name: str) -> str:
        """``x * cos + rotate_half(x) * sin`` on ``[batch, heads, seq, head_dim]``."""
        g, half = self.g, self.spec.head_dim // 2
        x1, x2 = g.op("Split", [x, g.const([half, half])], name=f"{name}/split", outputs=2, axis=-1)
        rotated = g.op("Concat", [g.op("Neg", [x2], name=f"{name}/neg"), x1], name=f"{name}/rot", axis=-1)
        return g.op("Add", [g.op("Mul", [x, self.cos], name=f"{name}/cos"),
                            g.op("Mul", [rotated, self.sin], name=f"{name}/sin")], name=name)

    def heads(self, x: str, n: int, name: str) -> str:
        """``[batch, seq, n*head_dim]`` -> ``[batch, n, seq, head_dim]``."""
        split = self.g.op("Reshape", [x, self.g.const([0, 0, n, self.spec.head_dim])], name=f"{name}/split_heads")
        return self.g.op("Transpose", [split], name=f"{name}/bhsd", perm=[0, 2, 1, 3])

    # -- graph-wide values --------------------------------------------------------------------
    def attention_bias(self, input_ids: str, attention_mask: str) -> str:
        """Additive mask ``[batch, 1, 1, seq, total]``: 0 where attention is allowed, a large negative elsewhere.

        Query i sits at absolute position ``past_len + i``; it may see key j when ``j <= past_len + i``,
        ``attention_mask[:, j]`` is 1, and (sliding window) ``past_len + i - j < window``.
        """
        g = self.g
        seq = g.op("Shape", [input_ids], name="mask/seq", start=1, end=2)
        total = g.op("Shape", [attention_mask], name="mask/total", start=1, end=2)
        past = g.op("Sub", [total, seq], name="mask/past")
        scalar = lambda v, n: g.op("Squeeze", [v, g.const([0])], name=n)  # noqa: E731
        total_s = scalar(total, "mask/total_scalar")
        q_pos = g.op("Range", [scalar(past, "mask/past_scalar"), total_s, g.const(1)], name="mask/q_pos")
        k_pos = g.op("Range", [g.const(0), total_s, g.const(1)], name="mask/k_pos")
        q_col = g.op("Unsqueeze", [q_pos, g.const([1])], name="mask/q_col")  # [seq, 1]
        k_row = g.op("Unsqueeze", [k_pos, g.const([0])], name="mask/k_row")  # [1, total]
        allowed = g.op("LessOrEqual", [k_row, q_col], name="mask/causal")  # [seq, total]
        if self.spec.sliding_window is not None:
            oldest = g.op("Sub", [q_col, g.const(self.spec.sliding_window)], name="mask/window_start")
            allowed = g.op("And", [allowed, g.op("Greater", [k_row, oldest], name="mask/in_window")],
                           name="mask/causal_window")
        padding = g.op("Cast", [g.op("Unsqueeze", [attention_mask, g.const([1, 2])], name="mask/pad_b11t")],
                       name="mask/pad_bool", to=TensorProto.BOOL)  # [batch, 1, 1, total]
        allowed = g.op("And", [allowed, padding], name="mask/allowed")  # [batch, 1, seq, total]
        bias = g.op("Where", [allowed, self.fconst(0.0), self.fconst(self.cfg.spec.mask_value)], name="mask/bias")
        return g.op("Unsqueeze", [bias, g.const([1])], name="mask/bias_grouped")  # broadcast over KV groups

    # -- layers -------------------------------------------------------------------------------
    def attention(self, x: str, layer, i: int, past_k: str, past_v: str) -> str:
        g, s = self.g, self.spec
        name = f"layers.{i}/attn"
        bias = layer.bias.get
        q = self.heads(self.linear(x, layer.q, bias("q"), f"{name}/q"), s.num_heads, f"{name}/q")
        k = self.heads(self.linear(x, layer.k, bias("k"), f"{name}/k"), s.num_kv_heads, f"{name}/k")
        v = self.heads(self.linear(x, layer.v, bias("v"), f"{name}/v"), s.num_kv_heads, f"{name}/v")
        q = self.rotary(q, f"{name}/q_rope")
        k = self.rotary(k, f"{name}/k_rope")
        keys = g.op("Concat", [past_k, k], outputs=[f"present.{i}.key"], axis=2)
        values = g.op("Concat", [past_v, v], outputs=[f"present.{i}.value"], axis=2)
        # grouped-query attention: [b, kv, rep, seq, d] queries against [b, kv, 1, total, d] keys
        group = s.num_heads // s.num_kv_heads
        q = g.op("Mul", [q, self.fconst(1.0 / np.sqrt(s.head_dim))], name=f"{name}/q_scaled")
        q = g.op("Reshape", [q, g.const([0, s.num_kv_heads, group, -1, s.head_dim])], name=f"{name}/q_grouped")
        k_t = g.op("Transpose", [g.op("Unsqueeze", [keys, g.const([2])], name=f"{name}/k_grouped")],
                   name=f"{name}/k_t", perm=[0, 1, 2, 4, 3])
        scores = g.op("Add", [g.op("MatMul", [q, k_t], name=f"{name}/qk"), self.mask], name=f"{name}/masked")
        probs = g.op("Softmax", [scores], name=f"{name}/probs", axis=-1)
        v_grouped = g.op("Unsqueeze", [values, g.const([2])], name=f"{name}/v_grouped")
        ctx = g.op("MatMul", [probs, v_grouped], name=f"{name}/ctx")  # [b, kv, rep, seq, d]
        ctx = g.op("Reshape", [ctx, g.const([0, s.num_heads, -1, s.head_dim])], name=f"{name}/ctx_heads")
        ctx = g.op("Transpose", [ctx], name=f"{name}/ctx_bshd", perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", [ctx, g.const([0, 0, s.num_heads * s.head_dim])], name=f"{name}/ctx_flat")
        return self.linear(ctx, layer.o, bias("o"), f"{name}/o")

    def mlp(self, x: str, layer, i: int) -> str:
        g, name, bias = self.g, f"layers.{i}/mlp", layer.bias.get
        gate = self.linear(x, layer.gate, bias("gate"), f"{name}/gate")
        up = self.linear(x, layer.up, bias("up"), f"{name}/up")
        silu = g.op("Mul", [gate, g.op("Sigmoid", [gate], name=f"{name}/sigmoid")], name=f"{name}/silu")
        return self.linear(g.op("Mul", [silu, up], name=f"{name}/swiglu"), layer.down, bias("down"), f"{name}/down")

    def lm_head(self, x: str, weights: DecoderWeights, input_ids: str, embed: str) -> str:
        g, s = self.g, self.spec
        if weights.lm_head is not None:
            w = self.weight("lm_head.weight", np.ascontiguousarray(weights.lm_head.T))
            return g.op("MatMul", [x, w], outputs=["logits"])
        # tied: reuse the [vocab, hidden] embedding through Gemm(transB=1) instead of a transposed copy
        flat = g.op("Reshape", [x, g.const([-1, s.hidden_size])], name="lm_head/flat")
        logits = g.op("Gemm", [flat, embed], name="lm_head/gemm", transB=1)
        shape = g.op("Concat", [g.op("Shape", [input_ids], name="lm_head/bs"), g.const([s.vocab_size])],
                     name="lm_head/shape", axis=0)
        return g.op("Reshape", [logits, shape], outputs=["logits"])

    # -- whole graph --------------------------------------------------------------------------
    def build(self, weights: DecoderWeights) -> GraphBuilder:
        g, s, f = self.g, self.spec, self.float
        input_ids = g.input("input_ids", INT64, ["batch_size", "sequence_length"])
        attention_mask = g.input("attention_mask", INT64, ["batch_size", "total_sequence_length"])
        position_ids = g.input("position_ids", INT64, ["batch_size", "sequence_length"])
        past_shape = ["batch_size", s.num_kv_heads, "past_sequence_length", s.head_dim]
        past = [(g.input(f"past_key_values.{i}.key", f, past_shape),
                 g.input(f"past_key_values.{i}.value", f, past_shape)) for i in range(s.num_layers)]

        embed = self.weight("model.embed_tokens.weight", weights.embed)
        h = g.op("Gather", [embed, input_ids], name="embed")
        cos_table, sin_table = rope_tables(s)
        rope = {}
        for kind, table in (("cos", cos_table), ("sin", sin_table)):
            gathered = g.op("Gather", [self.weight(f"rope.{kind}", table), position_ids], name=f"rope/{kind}_bsd")
            rope[kind] = g.op("Unsqueeze", [gathered, g.const([1])], name=f"rope/{kind}")  # [b, 1, seq, d]
        self.cos, self.sin = rope["cos"], rope["sin"]
        self.mask = self.attention_bias(input_ids, attention_mask)

        for i, layer in enumerate(weights.layers):
            attn = self.attention(self.rms_norm(h, layer.input_norm, f"layers.{i}/input_norm"), layer, i, *past[i])
            h = g.op("Add", [h, attn], name=f"layers.{i}/attn_residual")
            mlp = self.mlp(self.rms_norm(h, layer.post_attention_norm, f"layers.{i}/post_attention_norm"), layer, i)
            h = g.op("Add", [h, mlp], name=f"layers.{i}/mlp_residual")
        h = self.rms_norm(h, weights.norm, "norm")
        logits = self.lm_head(h, weights, input_ids, embed)

        g.output(logits, f, ["batch_size", "sequence_length", s.vocab_size])
        present_shape = ["batch_size", s.num_kv_heads, "total_sequence_length", s.head_dim]
        for i in range(s.num_layers):
            g.output(f"present.{i}.key", f, present_shape)
            g.output(f"present.{i}.value", f, present_shape)
        g.metadata["edgesmith.effective_config"] = json.dumps(s.to_dict(), sort_keys=True)
        g.metadata["edgesmith.precision"] = self.cfg.precision
        return g
