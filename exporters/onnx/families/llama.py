"""Llama family (LlamaForCausalLM, MistralForCausalLM; SmolLM2 is a Llama).

Reads the effective hyper-parameters from config.json and maps Hugging Face tensor names to
``DecoderWeights``. Every expected tensor's name and shape is checked against the checkpoint
headers before any tensor is loaded.
"""
from __future__ import annotations

from pathlib import Path

from exporters.hf import positive_int, refuse

from . import DecoderSpec, DecoderWeights
from .common import Tensor, default_rope, linear_tensors, load_decoder, read_common

MODEL_TYPES = ("llama", "mistral")

# role -> module path inside a layer
PROJECTIONS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
               "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
# which config flag adds a bias to which roles
BIAS_FLAGS = {"attention_bias": ("q", "k", "v", "o"), "mlp_bias": ("gate", "up", "down")}
NORMS = {"input_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm"}

# kept under its old name: the ONNX tests and callers read the rope through this family
read_rope = default_rope


def read_spec(config: dict) -> DecoderSpec:
    """The effective decoder hyper-parameters; PreflightError for anything the graph cannot express."""
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise refuse(f"`model_type` must be one of {MODEL_TYPES} for the Llama family", model_type,
                     "use the family that matches model_type")
    common = read_common(config)
    window = config.get("sliding_window") if model_type == "mistral" else None
    if window is not None:
        window = positive_int(config, "sliding_window")
    theta, theta_source = read_rope(config)
    return DecoderSpec(**common, rope_theta=theta, rope_theta_source=theta_source,
                       attention_bias=bool(config.get("attention_bias", False)),
                       mlp_bias=bool(config.get("mlp_bias", False)), sliding_window=window)


def layer_tensors(spec: DecoderSpec) -> list[Tensor]:
    biases = tuple(role for flag, roles in BIAS_FLAGS.items() if getattr(spec, flag) for role in roles)
    norms = [Tensor(f"{path}.weight", (spec.hidden_size,), (role,)) for role, path in NORMS.items()]
    return linear_tensors(spec, PROJECTIONS, biases) + norms


def load_weights(model_dir: str | Path, spec: DecoderSpec) -> DecoderWeights:
    """Check every tensor name and shape, then load them all as float32."""
    return load_decoder(model_dir, spec, layer_tensors(spec))
