"""Model families: architecture-specific config reading and weight-name mapping.

A family module turns a Hugging Face model directory into a format-neutral ``DecoderSpec`` and
``DecoderWeights``; the exporter writes the graph from those and never sees a tensor name.
Each family module exposes ``MODEL_TYPES``, ``read_spec(config) -> DecoderSpec`` and
``load_weights(model_dir, spec) -> DecoderWeights``; ``common.py`` holds what they share (the
config keys every decoder has, and a table-driven loader that checks every tensor's name and
shape from the safetensors headers before loading any).

| family | model_type | beyond the Llama math |
|---|---|---|
| llama | llama, mistral | Mistral: sliding window on every layer |
| qwen2 | qwen2 | q/k/v biases; sliding window on the layers ``layer_types`` marks |
| phi3 | phi3 | fused qkv / gate_up in the checkpoint; partial rotary; sliding window on every layer |
| gemma3 | gemma3_text, gemma3 | the table in gemma3.py (norms, embedding scale, GELU, rope, ...) |
"""
from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field
from types import ModuleType

import numpy as np

from toolchain.core.errors import PreflightError

# model_type (config.json) -> family module under exporters.onnx.families
FAMILIES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",  # same tensor names and math; adds an optional sliding window
    "qwen2": "qwen2",
    "phi3": "phi3",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",  # the multimodal checkpoint's language model only
}


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def family_for(model_type: str | None) -> ModuleType:
    """The family module for ``model_type``, or a PreflightError saying what is supported."""
    if model_type not in FAMILIES:
        raise PreflightError(
            f"the ONNX exporter supports model_type {', '.join(map(repr, supported_model_types()))}; "
            f"this model is {model_type!r} (fix: choose another export target for this model, "
            f"or file an issue asking for {model_type!r} support in the ONNX exporter)")
    return importlib.import_module(f"{__name__}.{FAMILIES[model_type]}")


FULL, SLIDING = "full_attention", "sliding_attention"  # Hugging Face's `layer_types` values
LAYER_TYPES = (FULL, SLIDING)
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # the gated MLP's activation, by its canonical name


@dataclass(frozen=True)
class DecoderSpec:
    """The effective hyper-parameters of a Llama-style decoder, as the export uses them.

    The fields after ``sliding_window`` describe what other families add to the Llama math; their
    defaults are Llama's, so a Llama spec never sets them. The graphs read them through the
    methods below (``window(i)``, ``rope(i)``, ``rotary``, ``attention_scale``).
    """

    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    rms_norm_eps: float
    rope_theta: float
    rope_theta_source: str  # which config key it came from (see docs/architecture.md, facts: the rope_theta pitfall)
    tie_word_embeddings: bool
    attention_bias: bool = False  # q/k/v/o projections have biases
    mlp_bias: bool = False
    sliding_window: int | None = None  # on every layer, or on the `layer_types` sliding ones
    # -- other families --------------------------------------------------------------------------
    hidden_act: str = "silu"  # one of ACTIVATIONS
    qkv_bias: bool = False  # q/k/v projections have biases, o has none (Qwen2)
    rotary_dim: int | None = None  # rotary on the first rotary_dim values of each head (Phi3 partial); None: all
    rope_scaling_factor: float = 1.0  # linear rope scaling (angles divided by it) of full-attention layers
    layer_types: tuple[str, ...] | None = None  # per layer, one of LAYER_TYPES; None: every layer alike
    local_rope_theta: float | None = None  # sliding layers' own rope (Gemma3); None: the same as full layers
    local_rope_theta_source: str | None = None
    local_rope_scaling_factor: float = 1.0
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 (Gemma3); None: head_dim
    embedding_scale: float | None = None  # token embeddings multiplied by it (Gemma3: sqrt(hidden_size))
    qk_norm: bool = False  # RMSNorm over head_dim on queries and keys, before rotary (Gemma3)
    sandwich_norms: bool = False  # RMSNorm on attention and MLP outputs before each residual add (Gemma3)
    final_logit_softcapping: float | None = None  # logits = tanh(logits / c) * c

    def to_dict(self) -> dict:
        return asdict(self)

    def window(self, i: int) -> int | None:
        """Layer ``i``'s sliding window (key j visible from query q when ``q - j < window``), or None."""
        if self.layer_types is not None and self.layer_types[i] != SLIDING:
            return None
        return self.sliding_window

    def rope(self, i: int) -> tuple[float, float]:
        """Layer ``i``'s rotary embedding: (theta, linear scaling factor)."""
        if self.layer_types is not None and self.layer_types[i] == SLIDING and self.local_rope_theta is not None:
            return self.local_rope_theta, self.local_rope_scaling_factor
        return self.rope_theta, self.rope_scaling_factor

    @property
    def rotary(self) -> int:
        """How many values of each head the rotary embedding turns."""
        return self.rotary_dim or self.head_dim

    @property
    def attention_scale(self) -> float:
        return float((self.query_pre_attn_scalar or self.head_dim) ** -0.5)

    def rope_angles(self, theta: float, factor: float = 1.0) -> np.ndarray:
        """``position * inv_freq`` as ``[max_positions, rotary / 2]``, in float32 as transformers computes
        it (linear scaling divides ``inv_freq`` by the factor)."""
        d = self.rotary
        inv_freq = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
        if factor != 1.0:
            inv_freq = inv_freq / np.float32(factor)
        positions = np.arange(self.max_positions, dtype=np.float32)[:, None]
        return positions * inv_freq.astype(np.float32)[None, :]


@dataclass
class LayerWeights:
    """One decoder layer; projection matrices in Hugging Face layout ``[out, in]``, float32.

    Norm weights are the factors the graph multiplies by: a family whose RMSNorm scales by
    ``1 + w`` (Gemma3) stores ``1 + w``. ``post_attention_norm`` is the norm in front of the MLP
    (Llama's ``post_attention_layernorm``, Gemma3's ``pre_feedforward_layernorm``).
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    o: np.ndarray
    gate: np.ndarray
    up: np.ndarray
    down: np.ndarray
    input_norm: np.ndarray
    post_attention_norm: np.ndarray
    bias: dict[str, np.ndarray] = field(default_factory=dict)  # role ("q", "gate", ...) -> [out]
    q_norm: np.ndarray | None = None  # [head_dim], shared by every query head (Gemma3)
    k_norm: np.ndarray | None = None
    attn_out_norm: np.ndarray | None = None  # on the attention output, before the residual add (Gemma3)
    mlp_out_norm: np.ndarray | None = None  # on the MLP output, before the residual add (Gemma3)


@dataclass
class DecoderWeights:
    embed: np.ndarray  # [vocab, hidden]
    layers: list[LayerWeights]
    norm: np.ndarray  # [hidden]
    lm_head: np.ndarray | None  # [vocab, hidden]; None when tied to ``embed``
