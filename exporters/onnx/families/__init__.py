"""Model families: architecture-specific config reading and weight-name mapping.

A family module turns a Hugging Face model directory into a format-neutral ``DecoderSpec`` and
``DecoderWeights``; the exporter writes the graph from those and never sees a tensor name.
Each family module exposes ``MODEL_TYPES``, ``read_spec(config) -> DecoderSpec`` and
``load_weights(model_dir, spec) -> DecoderWeights``.

The checkpoint reader here is shared: it lists every tensor's name and shape from the
safetensors header(s) first, so a family can check all of them before loading any.
"""
from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field
from types import ModuleType

import numpy as np

from toolchain.errors import PreflightError

# model_type (config.json) -> family module under exporters.onnx.families
FAMILIES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",  # same tensor names and math; adds an optional sliding window
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


@dataclass(frozen=True)
class DecoderSpec:
    """The effective hyper-parameters of a Llama-style decoder, as the export uses them."""

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
    rope_theta_source: str  # which config key it came from (see DESIGN.md, the rope_theta pitfall)
    tie_word_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LayerWeights:
    """One decoder layer; projection matrices in Hugging Face layout ``[out, in]``, float32."""

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


@dataclass
class DecoderWeights:
    embed: np.ndarray  # [vocab, hidden]
    layers: list[LayerWeights]
    norm: np.ndarray  # [hidden]
    lm_head: np.ndarray | None  # [vocab, hidden]; None when tied to ``embed``
