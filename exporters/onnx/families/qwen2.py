"""Qwen2 family (Qwen2ForCausalLM: Qwen2, Qwen2.5).

The Llama math with biases on the q/k/v projections (none on o, none in the MLP). A sliding
window, when ``use_sliding_window`` is true, applies only to the layers ``layer_types`` marks
``sliding_attention`` (transformers derives them as ``i >= max_window_layers`` when the file
lists none); with ``use_sliding_window`` false transformers drops ``sliding_window`` entirely.
"""
from __future__ import annotations

from pathlib import Path

from exporters.hf import positive_int, refuse

from . import FULL, LAYER_TYPES, SLIDING, DecoderSpec, DecoderWeights
from .common import (
    Tensor,
    check_model_type,
    default_rope,
    linear_tensors,
    load_decoder,
    read_common,
)
from .llama import NORMS, PROJECTIONS

MODEL_TYPES = ("qwen2",)
QKV_BIAS = ("q", "k", "v")
DEFAULT_MAX_WINDOW_LAYERS = 28  # transformers' Qwen2Config default


def layer_types(config: dict, num_layers: int, window: int | None) -> tuple[str, ...]:
    """Per layer full or sliding attention, as transformers' Qwen2Config derives it."""
    types = config.get("layer_types")
    if types is None:
        first = config.get("max_window_layers", DEFAULT_MAX_WINDOW_LAYERS)
        types = [SLIDING if window is not None and i >= first else FULL for i in range(num_layers)]
    if not isinstance(types, list | tuple) or len(types) != num_layers or set(types) - set(LAYER_TYPES):
        raise refuse(f"`layer_types` must list one of {LAYER_TYPES} for each of the {num_layers} layers", types,
                     "fix config.json")
    if SLIDING in types and window is None:
        raise refuse("`layer_types` names sliding layers, so `use_sliding_window` must be true with a "
                     "`sliding_window`", {"use_sliding_window": config.get("use_sliding_window"),
                                          "sliding_window": config.get("sliding_window")},
                     "correct config.json (transformers cannot run this configuration either)")
    return tuple(types)


def read_spec(config: dict) -> DecoderSpec:
    check_model_type(config, MODEL_TYPES, "Qwen2")
    common = read_common(config)
    window = config.get("sliding_window") if config.get("use_sliding_window") else None
    if window is not None:
        window = positive_int(config, "sliding_window")
    types = layer_types(config, common["num_layers"], window)
    theta, theta_source = default_rope(config)
    return DecoderSpec(**common, rope_theta=theta, rope_theta_source=theta_source, qkv_bias=True,
                       sliding_window=window if SLIDING in types else None,
                       layer_types=types if SLIDING in types else None)


def layer_tensors(spec: DecoderSpec) -> list[Tensor]:
    norms = [Tensor(f"{path}.weight", (spec.hidden_size,), (role,)) for role, path in NORMS.items()]
    return linear_tensors(spec, PROJECTIONS, QKV_BIAS) + norms


def load_weights(model_dir: str | Path, spec: DecoderSpec) -> DecoderWeights:
    return load_decoder(model_dir, spec, layer_tensors(spec))
