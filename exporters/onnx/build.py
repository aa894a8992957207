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
  instead of SmolLM2's 100000 and the model drifted (docs/architecture.md, facts). Here the effective values go
  into the manifest and the model's metadata, and the tests compare logits with transformers.

Math (as transformers' LlamaForCausalLM): RMSNorm in float32; rotary embeddings with the
``rotate_half`` convention from cos/sin tables gathered by ``position_ids``; grouped-query
attention (query heads grouped per KV head by a broadcasting MatMul, equivalent to repeating
the KV heads without copying them); a causal mask at absolute query positions
``past_len + i`` combined with ``attention_mask`` padding (and Mistral's sliding window);
SwiGLU MLP; final norm; lm_head (a ``Gemm(transB=1)`` on the embedding matrix when tied).
What the other families add (``DecoderSpec``'s optional fields) are hooks on the same graph:
q/k/v biases, partial rotary, per-layer sliding windows and rope tables, q/k norms, norms on
the attention and MLP outputs, GELU-tanh, a scaled embedding and final logit soft-capping.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from exporters.hf import read_config
from toolchain.core.errors import PreflightError

from .config import OnnxExportConfig
from .families import DecoderSpec, DecoderWeights, family_for
from .fused import FusedDecoderGraph, finish_decoder, gelu_tanh
from .fused import check as check_fused
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
    cfg = _config(config)
    hf_config = read_config(model_dir)
    spec = family_for(hf_config.get("model_type")).read_spec(hf_config)
    if cfg.graph == "fused":
        check_fused(spec)
    if cfg.quantize_embedding and spec.hidden_size % cfg.block_size:
        raise PreflightError(f"onnx export: `quantize_embedding` needs hidden_size ({spec.hidden_size}) to be a "
                             f"multiple of `block_size`, got {cfg.block_size} (fix: a block_size dividing "
                             f"{spec.hidden_size}, e.g. 32, or quantize_embedding: false)")


def export(model_dir: str | Path, out_dir: str | Path, config: OnnxExportConfig | dict | None = None,
           calibration: str | Path | None = None, imatrix: str | Path | None = None) -> dict:
    """Write ``model.onnx`` + ``model.onnx_data`` and the tokenizer files into ``out_dir`` (plus
    ``genai_config.json`` for onnxruntime-genai when the config asks for it).

    ``calibration``: the shared calibration sample (``calibration.json``), needed by int8 with
    static activations; ``imatrix``: the run's importance matrix, weighting the int8/int4 scale
    search when the config asks for it. Returns the export's manifest: format, precision, opset, files,
    effective config, graph summary.
    """
    cfg = _config(config)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    preflight(model_dir, cfg)
    hf_config = read_config(model_dir)
    family = family_for(hf_config["model_type"])
    spec = family.read_spec(hf_config)
    ranges = None
    if cfg.needs_calibration:
        if calibration is None:
            raise PreflightError("onnx export with `activations: static` needs the calibration sample "
                                 "(fix: run it through `edgesmith run`, which computes one, or pass calibration=)")
        from .calibrate import activation_ranges

        ranges = activation_ranges(model_dir, calibration, spec)
    importance = None
    if cfg.imatrix:
        if imatrix is None:
            raise PreflightError("onnx export with `imatrix: true` needs the run's importance matrix (fix: run it "
                                 "through `edgesmith run`, which computes one, or pass imatrix=)")
        from .calibrate import importance_from_imatrix

        importance = importance_from_imatrix(imatrix, spec)
    weights = family.load_weights(model_dir, spec)
    if cfg.graph == "fused":
        builder = FusedDecoderGraph(spec, cfg, ranges, importance)
        graph = builder.build(weights)
        quantized = builder.quant_summary
    else:
        graph, quantized = DecoderGraph(spec, cfg).build(weights), {}
    del weights

    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomically(graph, out_dir)
    copied = [name for name in SIDE_FILES if (model_dir / name).is_file()]
    for name in copied:
        shutil.copy2(model_dir / name, out_dir / name)
    manifest = {
        "format": "onnx",
        "precision": cfg.precision,
        "opset": cfg.opset,
        "export_config": cfg.to_dict(),
        "files": sorted([MODEL_FILE, DATA_FILE, *copied]),
        "effective_config": spec.to_dict(),
        "graph": {
            "kind": cfg.graph,
            "nodes": len(graph.nodes),
            "initializers": len(graph.initializers),
            "inputs": [v.name for v in graph.inputs],
            "outputs": [v.name for v in graph.outputs],
            "op_types": _op_counts(graph),
            "quantized_linears": quantized,
        },
    }
    if cfg.writes_genai:
        manifest["genai"] = _genai(out_dir, cfg)
        manifest["files"] = sorted(set(manifest["files"]) | set(manifest["genai"].get("files", [])))
    return manifest


def _genai(out_dir: Path, cfg: OnnxExportConfig) -> dict:
    """genai_config.json in the export folder, and onnxruntime-genai's tokenizer checked against
    transformers' on fixed strings and chat-template renderings: a drifted tokenizer fails the export."""
    from .genai import REQUIRED_SIDE_FILES, write_genai_folder

    missing = [n for n in REQUIRED_SIDE_FILES if not (out_dir / n).is_file()]
    if missing and cfg.genai is None:  # asked for by default only: a model folder without a tokenizer
        return {"written": False, "reason": f"the model folder has no {', '.join(missing)}"}
    genai = write_genai_folder(out_dir)
    check = genai.get("tokenizer_check", {})
    if check.get("ran") and not check.get("ok"):
        first = check["mismatches"][0]
        raise PreflightError(
            f"onnx export: onnxruntime-genai's tokenizer disagrees with transformers' on "
            f"{len(check['mismatches'])} check(s), e.g. {first.get('kind')} of {first.get('text')!r}: "
            f"transformers {first.get('hf')!r}, genai {first.get('genai')!r} (fix: check tokenizer.json and "
            f"config.json's model_type, or set `genai: false` to skip the onnxruntime-genai folder)")
    return {"written": True, **genai}


def _op_counts(graph: GraphBuilder) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.nodes:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def _validate(path: Path, graph: GraphBuilder) -> None:
    """onnx's checker for standard graphs; onnxruntime itself for graphs using its own kernels
    (the checker does not know them), so a graph that would not load is never published."""
    if not graph.uses_custom_ops():
        onnx.checker.check_model(str(path))
        return
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _write_atomically(graph: GraphBuilder, out_dir: Path) -> None:
    """Save and check in a temporary folder inside ``out_dir``, then move the pair into place."""
    tmp = Path(tempfile.mkdtemp(prefix=".onnx-export-", dir=out_dir))
    try:
        graph.save(tmp / MODEL_FILE, DATA_FILE)
        _validate(tmp / MODEL_FILE, graph)
        (out_dir / MODEL_FILE).unlink(missing_ok=True)  # never pair an old graph with new weights
        os.replace(tmp / DATA_FILE, out_dir / DATA_FILE)
        os.replace(tmp / MODEL_FILE, out_dir / MODEL_FILE)  # last: its presence means complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def rope_tables(spec: DecoderSpec, theta: float | None = None, factor: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin ``[max_positions, rotary]`` (theta: the full layers' by default), computed in
    float32 as transformers does."""
    angles = spec.rope_angles(spec.rope_theta if theta is None else theta, factor)
    emb = np.concatenate([angles, angles], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


class DecoderGraph:
    """Builds the decoder graph for one spec and export config."""

    def __init__(self, spec: DecoderSpec, cfg: OnnxExportConfig):
        self.spec, self.cfg = spec, cfg
        self.float = cfg.spec.compute_elem_type
        self.g = GraphBuilder(f"{spec.model_type}_decoder", cfg.opset)
        self.ropes: dict[tuple[float, float], tuple[str, str]] = {}  # (theta, factor) -> gathered (cos, sin)
        self.masks: dict[int | None, str] = {}  # sliding window (None: full) -> additive mask

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
        """``x / sqrt(mean(x^2) + eps) * w`` over the last axis, in the Pow/ReduceMean/Add/Sqrt/Div/Mul
        form that onnxruntime fuses into one SimplifiedLayerNormalization kernel. Always computed in
        float32, as transformers does: in float16, x^2 overflows for the large activations small models carry."""
        g, half = self.g, self.float == TensorProto.FLOAT16
        f32 = lambda v: g.const(v, np.float32)  # noqa: E731
        if half:
            x = g.op("Cast", [x], name=f"{name}/to_f32", to=TensorProto.FLOAT)
        square = g.op("Pow", [x, f32(2.0)], name=f"{name}/sq")
        mean_sq = g.reduce_mean(square, [-1], name=f"{name}/mean")
        std = g.op("Sqrt", [g.op("Add", [mean_sq, f32(self.spec.rms_norm_eps)], name=f"{name}/eps")],
                   name=f"{name}/std")
        normed = g.op("Div", [x, std], name=f"{name}/normed")
        if half:
            normed = g.op("Cast", [normed], name=f"{name}/to_f16", to=TensorProto.FLOAT16)
        return g.op("Mul", [normed, self.weight(f"{name}.weight", w)], name=name)

    def rotary(self, x: str, i: int, name: str) -> str:
        """``x * cos + rotate_half(x) * sin`` on ``[batch, heads, seq, head_dim]``, with layer ``i``'s
        tables, on the first ``rotary`` values of each head (the rest pass through)."""
        g, s = self.g, self.spec
        cos, sin = self.rope(i)
        rest = None
        if s.rotary < s.head_dim:
            x, rest = g.op("Split", [x, g.const([s.rotary, s.head_dim - s.rotary])], name=f"{name}/partial",
                           outputs=2, axis=-1)
        half = s.rotary // 2
        x1, x2 = g.op("Split", [x, g.const([half, half])], name=f"{name}/split", outputs=2, axis=-1)
        rotated = g.op("Concat", [g.op("Neg", [x2], name=f"{name}/neg"), x1], name=f"{name}/rot", axis=-1)
        out = g.op("Add", [g.op("Mul", [x, cos], name=f"{name}/cos"), g.op("Mul", [rotated, sin], name=f"{name}/sin")],
                   name=name if rest is None else f"{name}/turned")
        return out if rest is None else g.op("Concat", [out, rest], name=name, axis=-1)

    def activation(self, x: str, name: str) -> str:
        """The gated MLP's activation: SiLU, or GELU with the tanh approximation (gelu_pytorch_tanh)."""
        g = self.g
        if self.spec.hidden_act == "silu":
            return g.op("Mul", [x, g.op("Sigmoid", [x], name=f"{name}/sigmoid")], name=f"{name}/silu")
        return gelu_tanh(g, x, self.fconst, name)

    def heads(self, x: str, n: int, name: str) -> str:
        """``[batch, seq, n*head_dim]`` -> ``[batch, n, seq, head_dim]``."""
        split = self.g.op("Reshape", [x, self.g.const([0, 0, n, self.spec.head_dim])], name=f"{name}/split_heads")
        return self.g.op("Transpose", [split], name=f"{name}/bhsd", perm=[0, 2, 1, 3])

    # -- graph-wide values, built on first use --------------------------------------------------
    def rope(self, i: int) -> tuple[str, str]:
        """Layer ``i``'s cos and sin ``[batch, 1, seq, rotary]``, gathered by ``position_ids`` from
        one table per (theta, scaling) in use: ``rope.*`` for full layers, ``rope_local.*`` for sliding ones."""
        g, key = self.g, self.spec.rope(i)
        if key not in self.ropes:
            prefix = "rope" if key == (self.spec.rope_theta, self.spec.rope_scaling_factor) else "rope_local"
            gathered = []
            for kind, table in zip(("cos", "sin"), rope_tables(self.spec, *key)):
                table = self.weight(f"{prefix}.{kind}", table)
                bsd = g.op("Gather", [table, self.position_ids], name=f"{prefix}/{kind}_bsd")
                gathered.append(g.op("Unsqueeze", [bsd, g.const([1])], name=f"{prefix}/{kind}"))
            self.ropes[key] = (gathered[0], gathered[1])
        return self.ropes[key]

    def mask(self, i: int) -> str:
        """Layer ``i``'s additive mask ``[batch, 1, 1, seq, total]``: 0 where attention is allowed, a
        large negative elsewhere.

        Query i sits at absolute position ``past_len + i``; it may see key j when ``j <= past_len + i``,
        ``attention_mask[:, j]`` is 1, and (sliding window) ``past_len + i - j < window``.
        """
        g, window = self.g, self.spec.window(i)
        if window in self.masks:
            return self.masks[window]
        if not self.masks:
            seq = g.op("Shape", [self.input_ids], name="mask/seq", start=1, end=2)
            total = g.op("Shape", [self.attention_mask], name="mask/total", start=1, end=2)
            past = g.op("Sub", [total, seq], name="mask/past")
            scalar = lambda v, n: g.op("Squeeze", [v, g.const([0])], name=n)  # noqa: E731
            total_s = scalar(total, "mask/total_scalar")
            q_pos = g.op("Range", [scalar(past, "mask/past_scalar"), total_s, g.const(1)], name="mask/q_pos")
            k_pos = g.op("Range", [g.const(0), total_s, g.const(1)], name="mask/k_pos")
            self.q_col = g.op("Unsqueeze", [q_pos, g.const([1])], name="mask/q_col")  # [seq, 1]
            self.k_row = g.op("Unsqueeze", [k_pos, g.const([0])], name="mask/k_row")  # [1, total]
            self.causal = g.op("LessOrEqual", [self.k_row, self.q_col], name="mask/causal")  # [seq, total]
            pad = g.op("Unsqueeze", [self.attention_mask, g.const([1, 2])], name="mask/pad_b11t")
            self.padding = g.op("Cast", [pad], name="mask/pad_bool", to=TensorProto.BOOL)  # [batch, 1, 1, total]
        allowed, name = self.causal, "mask" if window is None else f"mask_window{window}"
        if window is not None:
            oldest = g.op("Sub", [self.q_col, g.const(window)], name=f"{name}/window_start")
            allowed = g.op("And", [allowed, g.op("Greater", [self.k_row, oldest], name=f"{name}/in_window")],
                           name=f"{name}/causal_window")
        allowed = g.op("And", [allowed, self.padding], name=f"{name}/allowed")  # [batch, 1, seq, total]
        bias = g.op("Where", [allowed, self.fconst(0.0), self.fconst(self.cfg.spec.mask_value)], name=f"{name}/bias")
        self.masks[window] = g.op("Unsqueeze", [bias, g.const([1])], name=f"{name}/bias_grouped")  # over KV groups
        return self.masks[window]

    # -- layers -------------------------------------------------------------------------------
    def attention(self, x: str, layer, i: int, past_k: str, past_v: str) -> str:
        g, s = self.g, self.spec
        name = f"layers.{i}/attn"
        bias = layer.bias.get
        q = self.heads(self.linear(x, layer.q, bias("q"), f"{name}/q"), s.num_heads, f"{name}/q")
        k = self.heads(self.linear(x, layer.k, bias("k"), f"{name}/k"), s.num_kv_heads, f"{name}/k")
        v = self.heads(self.linear(x, layer.v, bias("v"), f"{name}/v"), s.num_kv_heads, f"{name}/v")
        if layer.q_norm is not None:  # per head, over head_dim, before rotary (Gemma3)
            q = self.rms_norm(q, layer.q_norm, f"{name}/q_norm")
            k = self.rms_norm(k, layer.k_norm, f"{name}/k_norm")
        q = self.rotary(q, i, f"{name}/q_rope")
        k = self.rotary(k, i, f"{name}/k_rope")
        keys = g.op("Concat", [past_k, k], outputs=[f"present.{i}.key"], axis=2)
        values = g.op("Concat", [past_v, v], outputs=[f"present.{i}.value"], axis=2)
        # grouped-query attention: [b, kv, rep, seq, d] queries against [b, kv, 1, total, d] keys
        group = s.num_heads // s.num_kv_heads
        q = g.op("Mul", [q, self.fconst(s.attention_scale)], name=f"{name}/q_scaled")
        q = g.op("Reshape", [q, g.const([0, s.num_kv_heads, group, -1, s.head_dim])], name=f"{name}/q_grouped")
        k_t = g.op("Transpose", [g.op("Unsqueeze", [keys, g.const([2])], name=f"{name}/k_grouped")],
                   name=f"{name}/k_t", perm=[0, 1, 2, 4, 3])
        scores = g.op("Add", [g.op("MatMul", [q, k_t], name=f"{name}/qk"), self.mask(i)], name=f"{name}/masked")
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
        gated = g.op("Mul", [self.activation(gate, name), up], name=f"{name}/gated")
        return self.linear(gated, layer.down, bias("down"), f"{name}/down")

    def lm_head(self, x: str, weights: DecoderWeights, input_ids: str, embed: str, out: str) -> str:
        g, s = self.g, self.spec
        if weights.lm_head is not None:
            w = self.weight("lm_head.weight", np.ascontiguousarray(weights.lm_head.T))
            return g.op("MatMul", [x, w], outputs=[out])
        # tied: reuse the [vocab, hidden] embedding through Gemm(transB=1) instead of a transposed copy
        flat = g.op("Reshape", [x, g.const([-1, s.hidden_size])], name="lm_head/flat")
        logits = g.op("Gemm", [flat, embed], name="lm_head/gemm", transB=1)
        shape = g.op("Concat", [g.op("Shape", [input_ids], name="lm_head/bs"), g.const([s.vocab_size])],
                     name="lm_head/shape", axis=0)
        return g.op("Reshape", [logits, shape], outputs=[out])

    def softcap(self, x: str, cap: float, out: str) -> str:
        """``tanh(x / cap) * cap`` (Gemma's final logit soft-capping)."""
        g = self.g
        t = g.op("Tanh", [g.op("Div", [x, self.fconst(cap)], name="softcap/div")], name="softcap/tanh")
        return g.op("Mul", [t, self.fconst(cap)], outputs=[out])

    # -- whole graph --------------------------------------------------------------------------
    def build(self, weights: DecoderWeights) -> GraphBuilder:
        g, s, f = self.g, self.spec, self.float
        self.input_ids = input_ids = g.input("input_ids", INT64, ["batch_size", "sequence_length"])
        self.attention_mask = g.input("attention_mask", INT64, ["batch_size", "total_sequence_length"])
        self.position_ids = g.input("position_ids", INT64, ["batch_size", "sequence_length"])
        past_shape = ["batch_size", s.num_kv_heads, "past_sequence_length", s.head_dim]
        past = [(g.input(f"past_key_values.{i}.key", f, past_shape),
                 g.input(f"past_key_values.{i}.value", f, past_shape)) for i in range(s.num_layers)]

        embed = self.weight("model.embed_tokens.weight", weights.embed)
        h = g.op("Gather", [embed, input_ids], name="embed")
        if s.embedding_scale is not None:  # in the weights' dtype, as transformers casts it
            h = g.op("Mul", [h, self.fconst(s.embedding_scale)], name="embed/scaled")
        for i, layer in enumerate(weights.layers):
            attn = self.attention(self.rms_norm(h, layer.input_norm, f"layers.{i}/input_norm"), layer, i, *past[i])
            if layer.attn_out_norm is not None:
                attn = self.rms_norm(attn, layer.attn_out_norm, f"layers.{i}/attn_out_norm")
            h = g.op("Add", [h, attn], name=f"layers.{i}/attn_residual")
            mlp = self.mlp(self.rms_norm(h, layer.post_attention_norm, f"layers.{i}/post_attention_norm"), layer, i)
            if layer.mlp_out_norm is not None:
                mlp = self.rms_norm(mlp, layer.mlp_out_norm, f"layers.{i}/mlp_out_norm")
            h = g.op("Add", [h, mlp], name=f"layers.{i}/mlp_residual")
        h = self.rms_norm(h, weights.norm, "norm")
        cap = s.final_logit_softcapping
        logits = self.lm_head(h, weights, input_ids, embed, "logits" if cap is None else "lm_head/logits")
        if cap is not None:
            logits = self.softcap(logits, cap, "logits")

        return finish_decoder(g, s, self.cfg, logits, f)
