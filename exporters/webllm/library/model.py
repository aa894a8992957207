"""The Llama / Qwen2 decoder as a TVM Relax ``nn.Module`` with mlc-llm's parameter layout.

Parameter names, shapes, dtypes and order are those of mlc-llm's ``LlamaForCausalLM`` and
``QWen2LMHeadModel`` (fused ``qkv_proj`` / ``c_attn`` and ``gate_up_proj``; group-quantised
layers carry ``q_weight`` / ``q_scale``; tied embeddings have no ``lm_head``), so weights written
for mlc-llm's prebuilt library run with this one and the other way round.

The exported functions are the ones @mlc-ai/web-llm calls (``embed``, ``prefill``, ``decode``,
``batch_prefill``, ``batch_decode``, ``create_tir_paged_kv_cache``); the sampler functions are
attached by ``sampler.py`` and ``_metadata`` by ``compile.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from tvm import relax as rx
from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache

from exporters.webllm.quant import GROUP_QUANT

from .quantized import GroupQuantEmbedding, GroupQuantLinear, TiedEmbedding

# model_type -> (attribute name of the fused q/k/v projection, whether it has a bias)
FAMILIES: dict[str, tuple[str, bool]] = {
    "llama": ("qkv_proj", False),
    "qwen2": ("c_attn", True),
}
# hidden_act -> activation, as mlc-llm's Qwen2 ACT2FN (Llama's FFN is always SiLU)
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": op.silu,
    "swish": op.silu,
    "gelu": lambda x: op.gelu(x),
    "gelu_new": lambda x: op.gelu(x, approximate="tanh"),
    "relu": op.relu,
}
DEFAULT_ACT = "silu"
DEFAULT_ROPE_BASE = 10000  # mlc-llm's LlamaConfig fallback when neither key is given
MAX_PREFILL_CHUNK = 8192  # mlc-llm's default cap on prefill_chunk_size


@dataclass(frozen=True)
class Dims:
    """The numbers of one decoder, normalised from an mlc-llm model config dict."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    context_window_size: int
    prefill_chunk_size: int
    rope_scaling: dict | None
    hidden_act: str = DEFAULT_ACT

    @classmethod
    def from_config(cls, model_type: str, cfg: dict[str, Any]) -> "Dims":
        if model_type not in FAMILIES:
            raise ValueError(f"model_type {model_type!r} has no library model; known: {sorted(FAMILIES)}")
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
        rope = cfg.get("position_embedding_base") or cfg.get("rope_theta") or DEFAULT_ROPE_BASE
        ctx = int(cfg.get("context_window_size") or cfg.get("max_position_embeddings") or 0)
        if ctx <= 0:
            raise ValueError("model config needs context_window_size (or max_position_embeddings)")
        chunk = int(cfg.get("prefill_chunk_size") or 0)
        if chunk <= 0 or chunk > ctx:
            chunk = min(ctx, MAX_PREFILL_CHUNK)
        act = cfg.get("hidden_act", DEFAULT_ACT) if model_type == "qwen2" else DEFAULT_ACT
        if act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {act!r} has no library activation; known: {sorted(ACTIVATIONS)}")
        scaling = cfg.get("rope_scaling")
        if scaling is not None and scaling.get("rope_type") != "llama3":
            scaling = None  # mlc-llm drops scaling types it does not implement for these models
        return cls(
            model_type=model_type,
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=int(cfg["vocab_size"]),
            rms_norm_eps=float(cfg["rms_norm_eps"]),
            rope_theta=float(rope),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            context_window_size=ctx,
            prefill_chunk_size=chunk,
            rope_scaling=scaling,
            hidden_act=act,
        )


def is_group_quant(spec: Any) -> bool:
    return getattr(spec, "kind", None) == GROUP_QUANT


class _Layers:
    """Factory for the linear / embedding modules of one quantisation."""

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.dtype = str(spec.model_dtype)
        self.quant = is_group_quant(spec)

    def linear(self, in_f: int, out_f: int, bias: bool = False) -> nn.Module:
        if self.quant:
            return GroupQuantLinear(in_f, out_f, self.spec, bias=bias)
        return nn.Linear(in_f, out_f, bias=bias, dtype=self.dtype)

    def lm_head(self, in_f: int, out_f: int) -> nn.Module:
        if self.quant:
            return GroupQuantLinear(in_f, out_f, self.spec, bias=False, out_dtype="float32")
        return nn.Linear(in_f, out_f, bias=False, dtype=self.dtype, out_dtype="float32")

    def embedding(self, num: int, dim: int) -> nn.Module:
        if self.quant:
            return GroupQuantEmbedding(num, dim, self.spec)
        return TiedEmbedding(num, dim, dtype=self.dtype)

    def norm(self, dims: Dims) -> nn.Module:
        return nn.RMSNorm(dims.hidden_size, -1, dims.rms_norm_eps, bias=False, dtype=self.dtype)


class Attention(nn.Module):
    def __init__(self, dims: Dims, make: _Layers) -> None:
        self.dims = dims
        proj_name, bias = FAMILIES[dims.model_type]
        self.proj_name = proj_name
        qkv_out = (dims.num_heads + 2 * dims.num_kv_heads) * dims.head_dim
        setattr(self, proj_name, make.linear(dims.hidden_size, qkv_out, bias=bias))
        self.o_proj = make.linear(dims.num_heads * dims.head_dim, dims.hidden_size)

    def forward(self, x: Tensor, kv: PagedKVCache, layer_id: int) -> Tensor:
        d = self.dims
        b, s, _ = x.shape
        qkv = getattr(self, self.proj_name)(x)
        qkv = op.reshape(qkv, (b, s, d.num_heads + 2 * d.num_kv_heads, d.head_dim))
        out = kv.attention_with_fused_qkv(layer_id, qkv, d.num_heads, sm_scale=d.head_dim**-0.5)
        return self.o_proj(op.reshape(out, (b, s, d.num_heads * d.head_dim)))


class MLP(nn.Module):
    def __init__(self, dims: Dims, make: _Layers) -> None:
        self.gate_up_proj = make.linear(dims.hidden_size, 2 * dims.intermediate_size)
        self.down_proj = make.linear(dims.intermediate_size, dims.hidden_size)
        self.act = ACTIVATIONS[dims.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        gate, up = op.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, dims: Dims, make: _Layers) -> None:
        self.self_attn = Attention(dims, make)
        self.mlp = MLP(dims, make)
        self.input_layernorm = make.norm(dims)
        self.post_attention_layernorm = make.norm(dims)

    def forward(self, x: Tensor, kv: PagedKVCache, layer_id: int) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), kv, layer_id)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    def __init__(self, dims: Dims, make: _Layers) -> None:
        self.embed_tokens = make.embedding(dims.vocab_size, dims.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(dims, make) for _ in range(dims.num_layers)])
        self.norm = make.norm(dims)

    def forward(self, x: Tensor, kv: PagedKVCache) -> Tensor:
        for layer_id, layer in enumerate(self.layers):
            x = layer(x, kv, layer_id)
        return self.norm(x)


def _last_token(x: te.Tensor) -> te.Tensor:
    b, s, d = x.shape
    return te.compute((b, 1, d), lambda i, _, k: x[i, s - 1, k], name="last_token")


class CausalLM(nn.Module):
    """mlc-llm's ``LlamaForCausalLM`` / ``QWen2LMHeadModel`` parameter tree and entry points."""

    def __init__(self, dims: Dims, spec: Any, target: Any) -> None:
        make = _Layers(spec)
        self.dims = dims
        self.dtype = make.dtype
        self.target = target
        self.model = DecoderModel(dims, make)
        if not dims.tie_word_embeddings:
            self.lm_head = make.lm_head(dims.hidden_size, dims.vocab_size)

    # -- pieces ---------------------------------------------------------------------------
    def _logits(self, hidden: Tensor) -> Tensor:
        if self.dims.tie_word_embeddings:
            logits = self.model.embed_tokens.lm_head_forward(hidden)
        else:
            logits = self.lm_head(hidden)
        return logits if logits.dtype == "float32" else logits.astype("float32")

    # -- exported functions ---------------------------------------------------------------
    def embed(self, input_ids: Tensor) -> Tensor:
        return self.model.embed_tokens(input_ids)

    def prefill(self, input_embed: Tensor, paged_kv_cache: PagedKVCache):
        hidden = self.model(input_embed, paged_kv_cache)
        hidden = op.tensor_expr_op(_last_token, name_hint="last_token", args=[hidden])
        return self._logits(hidden), paged_kv_cache

    def decode(self, input_embed: Tensor, paged_kv_cache: PagedKVCache):
        return self._logits(self.model(input_embed, paged_kv_cache)), paged_kv_cache

    def batch_prefill(self, input_embeds: Tensor, logit_positions: Tensor,
                      paged_kv_cache: PagedKVCache):
        hidden = self.model(input_embeds, paged_kv_cache)
        hidden = op.take(hidden, logit_positions, axis=1)
        return self._logits(hidden), paged_kv_cache

    def batch_decode(self, input_embeds: Tensor, paged_kv_cache: PagedKVCache):
        return self._logits(self.model(input_embeds, paged_kv_cache)), paged_kv_cache

    def create_tir_paged_kv_cache(self, max_batch_size: tirx.Var, max_total_seq_len: tirx.Var,
                                  prefill_chunk_size: tirx.Var, page_size: tirx.Var,
                                  support_sliding_window: tirx.Var) -> PagedKVCache:
        d = self.dims
        return TIRPagedKVCache(
            attn_kind="mha",
            max_batch_size=max_batch_size,
            max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size,
            page_size=page_size,
            support_sliding_window=support_sliding_window,
            layer_partition=rx.ShapeExpr([0, d.num_layers]),
            num_hidden_layers=d.num_layers,
            num_attention_heads=d.num_heads,
            num_key_value_heads=d.num_kv_heads,
            qk_head_dim=d.head_dim,
            v_head_dim=d.head_dim,
            mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0,
            rope_mode=RopeMode.NORMAL,
            rope_scale=1,
            rope_theta=d.rope_theta,
            rope_scaling=d.rope_scaling or {},
            rope_ext_factors=rx.prim_value(0),
            rotary_dim=d.head_dim,
            enable_disaggregation=False,
            dtype=self.dtype,
            target=self.target,
        )

    def get_default_spec(self) -> nn.spec.ModuleSpec:
        h, dt = self.dims.hidden_size, self.dtype
        packed = {"param_mode": "packed", "effect_mode": "none"}
        kv = nn.spec.Object(object_type=PagedKVCache)
        spec = {
            "embed": {"input_ids": nn.spec.Tensor(["seq_len"], "int32"), "$": packed},
            "prefill": {"input_embed": nn.spec.Tensor([1, "seq_len", h], dt),
                        "paged_kv_cache": kv, "$": packed},
            "decode": {"input_embed": nn.spec.Tensor([1, 1, h], dt),
                       "paged_kv_cache": kv, "$": packed},
            "batch_prefill": {"input_embeds": nn.spec.Tensor([1, "seq_len", h], dt),
                              "logit_positions": nn.spec.Tensor(["batch_size"], "int32"),
                              "paged_kv_cache": kv, "$": packed},
            "batch_decode": {"input_embeds": nn.spec.Tensor(["batch_size", 1, h], dt),
                             "paged_kv_cache": kv, "$": packed},
            "create_tir_paged_kv_cache": {
                "max_batch_size": int, "max_total_seq_len": int, "prefill_chunk_size": int,
                "page_size": int, "support_sliding_window": int,
                "$": {"param_mode": "none", "effect_mode": "none"},
            },
        }
        return nn.spec.ModuleSpec.from_raw(spec, self)


def build_model(model_type: str, model_config: dict[str, Any], spec: Any,
                target: Any) -> tuple[CausalLM, Dims]:
    """The library model for ``model_type`` with ``model_config`` (mlc-llm field names)."""
    dims = Dims.from_config(model_type, model_config)
    return CausalLM(dims, spec, target), dims


def param_names(model_type: str, model_config: dict[str, Any], spec: Any) -> list[str]:
    """The parameter names in the library's order (the ``_metadata`` params list order)."""
    from tvm.target import (
        Target,  # local: only for the KV cache kernels, never built here
    )

    model, _ = build_model(model_type, model_config, spec, Target({"kind": "llvm"}))
    return [name for name, _ in model.named_parameters()]

