"""Gemma3 family: Gemma3ForCausalLM (``gemma3_text``) and the language model of
Gemma3ForConditionalGeneration (``gemma3``; the vision tower and projector are not exported).

What differs from Llama, as transformers 5.24's modeling_gemma3 computes it:

| feature | Gemma3 | here |
|---|---|---|
| token embedding | times ``sqrt(hidden_size)`` cast to the weights' dtype | ``embedding_scale`` |
| RMSNorm | ``x_normed * (1 + w)`` in float32 (all norms, q/k norms too) | ``1 + w`` stored at load |
| q/k norms | RMSNorm over ``head_dim`` per head, after the projection, before rotary | ``qk_norm`` |
| norms per layer | input; post-attention (on the attention output); pre-feedforward; post-feedforward | ``sandwich_norms`` |
| MLP | gated, ``gelu_pytorch_tanh`` | ``hidden_act`` |
| attention scale | ``query_pre_attn_scalar ** -0.5`` | ``query_pre_attn_scalar`` |
| sliding window | on ``layer_types`` = ``sliding_attention`` layers, ``q - k < sliding_window`` | ``layer_types`` |
| rope | per layer type, default or linear (see ``layer_rope``) | ``rope``, ``local_rope_*`` |
| final softcap | ``tanh(logits / c) * c``, Gemma3ForCausalLM only (see ``text_config``) | ``final_logit_softcapping`` |

``attn_logit_softcapping`` is accepted and, as in transformers 5.24 (its Gemma3Attention never
passes it on), not applied. Tensor names: ``model.*`` (Gemma3ForCausalLM), and for ``gemma3``
checkpoints ``language_model.model.*`` (what transformers 5.24 writes, and 4 wrote) or
``model.language_model.*``; the lm_head is tied per the top-level ``tie_word_embeddings``.
"""
from __future__ import annotations

from pathlib import Path

from exporters.hf import ROPE_DEFAULT, Rope, positive_int, refuse
from exporters.hf import read_rope as hf_read_rope

from . import FULL, LAYER_TYPES, SLIDING, DecoderSpec, DecoderWeights
from .common import Tensor, check_model_type, linear_tensors, load_decoder, read_common
from .llama import PROJECTIONS

MODEL_TYPES = ("gemma3_text", "gemma3")
MULTIMODAL = "gemma3"
ROPE_LINEAR = "linear"
# transformers' Gemma3TextConfig defaults
DEFAULT_THETA = {FULL: 1_000_000.0, SLIDING: 10_000.0}
THETA_KEY = {FULL: "rope_theta", SLIDING: "rope_local_base_freq"}  # transformers 4 layout
DEFAULT_HEAD_DIM, DEFAULT_SCALAR, DEFAULT_WINDOW, DEFAULT_PATTERN = 256, 256, 4096, 6
PREFIXES = ("model", "language_model.model", "model.language_model")
LM_HEADS = ("lm_head.weight", "language_model.lm_head.weight")
VISION_PARTS = ("vision_tower", "multi_modal_projector")
# HF norm name -> LayerWeights field (see LayerWeights: post_attention_norm is the pre-MLP norm)
NORMS = {"input_layernorm": "input_norm", "post_attention_layernorm": "attn_out_norm",
         "pre_feedforward_layernorm": "post_attention_norm", "post_feedforward_layernorm": "mlp_out_norm"}


def text_config(config: dict) -> dict:
    """The language model's config: ``text_config`` of a multimodal checkpoint, with the top-level
    ``tie_word_embeddings`` (the one transformers 5.24 ties the lm_head by)."""
    if config.get("model_type") != MULTIMODAL:
        return {"tie_word_embeddings": True, **config}
    text = dict(config.get("text_config") or {})
    text.update(model_type=MULTIMODAL, tie_word_embeddings=config.get("tie_word_embeddings", True),
                final_logit_softcapping=None)  # Gemma3ForConditionalGeneration never applies it
    return text


def layer_rope(config: dict, layer_type: str) -> Rope:
    """The rotary embedding of one layer type, read through ``exporters.hf.read_rope``.

    transformers 5 writes ``rope_parameters: {"full_attention": {...}, "sliding_attention": {...}}``;
    transformers 4 wrote ``rope_theta`` + ``rope_scaling`` (the global rope) and
    ``rope_local_base_freq`` (the local one, never scaled). Both fall back to 1e6 / 1e4.
    """
    key, default = THETA_KEY[layer_type], DEFAULT_THETA[layer_type]
    params = config.get("rope_parameters")
    view = {"rope_theta": config[key]} if key in config else {}  # transformers' fallback for this layer type
    if params is None:  # transformers 4 layout: rope_scaling scales the global rope only
        if layer_type == FULL and config.get("rope_scaling") is not None:
            view["rope_scaling"] = config["rope_scaling"]
    elif not isinstance(params, dict) or not params or set(params) - set(LAYER_TYPES):
        raise refuse(f"`rope_parameters` must be keyed by layer type {LAYER_TYPES} for gemma3 (transformers "
                     f"ignores a flat one and uses its default thetas)", params,
                     "write rope_parameters as {'full_attention': {...}, 'sliding_attention': {...}}")
    elif isinstance(params.get(layer_type), dict):
        view["rope_parameters"] = {layer_type: params[layer_type]}
    rope = hf_read_rope(view, layer_type, default)
    if rope.source == "rope_theta":  # the fallback key, under its real name
        rope = Rope(rope.theta, key, rope.rope_type, rope.params)
    factor = rope.params.get("factor")
    if rope.rope_type not in (ROPE_DEFAULT, ROPE_LINEAR) or (rope.rope_type == ROPE_LINEAR and not (
            isinstance(factor, int | float) and factor > 0)):
        raise refuse(f"the {layer_type} rope must be 'default' or 'linear' with a positive `factor` for the ONNX "
                     f"exporter", {"rope_type": rope.rope_type, "factor": factor},
                     "file an issue asking for this rope type")
    return rope


def layer_types(config: dict, num_layers: int) -> tuple[str, ...]:
    types = config.get("layer_types")
    if types is None:  # transformers derives them from the pattern: every n-th layer is global
        pattern = config.get("sliding_window_pattern", config.get("_sliding_window_pattern", DEFAULT_PATTERN))
        types = [SLIDING if (i + 1) % pattern else FULL for i in range(num_layers)]
    if not isinstance(types, list | tuple) or len(types) != num_layers or set(types) - set(LAYER_TYPES):
        raise refuse(f"`layer_types` must list one of {LAYER_TYPES} for each of the {num_layers} layers", types,
                     "fix config.json")
    return tuple(types)


def read_spec(config: dict) -> DecoderSpec:
    check_model_type(config, MODEL_TYPES, "Gemma3")
    config = text_config(config)
    common = read_common(config, act_key="hidden_activation", acts=("gelu_pytorch_tanh",),
                         head_dim_default=DEFAULT_HEAD_DIM)
    if config.get("use_bidirectional_attention"):
        raise refuse("`use_bidirectional_attention` must be false: the ONNX decoder is causal", True,
                     "export the causal (generation) model")
    types = layer_types(config, common["num_layers"])
    window = config.get("sliding_window", DEFAULT_WINDOW) if SLIDING in types else None
    if SLIDING in types:
        window = positive_int({"sliding_window": window}, "sliding_window")
    scalar = config.get("query_pre_attn_scalar", DEFAULT_SCALAR)
    if isinstance(scalar, bool) or not isinstance(scalar, int | float) or scalar <= 0:
        raise refuse("`query_pre_attn_scalar` must be a positive number", scalar, "fix config.json")
    softcap = config.get("final_logit_softcapping")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, int | float) or softcap <= 0):
        raise refuse("`final_logit_softcapping` must be null or a positive number", softcap, "fix config.json")
    full = layer_rope(config, FULL)
    local = layer_rope(config, SLIDING) if SLIDING in types else None
    return DecoderSpec(
        **common, rope_theta=full.theta, rope_theta_source=full.source,
        rope_scaling_factor=float(full.params.get("factor", 1.0)),
        attention_bias=bool(config.get("attention_bias", False)), sliding_window=window, layer_types=types,
        local_rope_theta=local and local.theta, local_rope_theta_source=local and local.source,
        local_rope_scaling_factor=float(local.params.get("factor", 1.0)) if local else 1.0,
        query_pre_attn_scalar=float(scalar), embedding_scale=float(common["hidden_size"] ** 0.5),
        qk_norm=True, sandwich_norms=True, final_logit_softcapping=None if softcap is None else float(softcap))


def layer_tensors(spec: DecoderSpec) -> list[Tensor]:
    h, d = spec.hidden_size, spec.head_dim
    biases = ("q", "k", "v", "o") if spec.attention_bias else ()
    norms = [Tensor(f"{name}.weight", (h,), (role,), plus_one=True) for name, role in NORMS.items()]
    qk = [Tensor(f"self_attn.{role}.weight", (d,), (role,), plus_one=True) for role in ("q_norm", "k_norm")]
    return linear_tensors(spec, PROJECTIONS, biases) + norms + qk


def _vision(name: str) -> bool:
    parts = name.split(".")
    return parts[0] in VISION_PARTS or (parts[0] == "model" and len(parts) > 1 and parts[1] in VISION_PARTS)


def load_weights(model_dir: str | Path, spec: DecoderSpec) -> DecoderWeights:
    return load_decoder(model_dir, spec, layer_tensors(spec), prefix=PREFIXES, lm_head=LM_HEADS, norm_plus_one=True,
                        ignore=_vision if spec.model_type == MULTIMODAL else (lambda name: False))
