"""Llama family (LlamaForCausalLM, MistralForCausalLM; SmolLM2 is a Llama).

Reads the effective hyper-parameters from config.json and maps Hugging Face tensor names to
``DecoderWeights``. Every expected tensor's name and shape is checked against the checkpoint
headers before any tensor is loaded.
"""
from __future__ import annotations

from pathlib import Path

from exporters.hf import IGNORED_SUFFIXES, ROPE_DEFAULT, Checkpoint, positive_int, refuse
from exporters.hf import read_rope as hf_read_rope

from . import DecoderSpec, DecoderWeights, LayerWeights

MODEL_TYPES = ("llama", "mistral")
SUPPORTED_ACTIVATIONS = ("silu", "swish")  # the same function under two names

# role -> (module path inside a layer, which config flag adds a bias to it)
PROJECTIONS = {
    "q": ("self_attn.q_proj", "attention_bias"),
    "k": ("self_attn.k_proj", "attention_bias"),
    "v": ("self_attn.v_proj", "attention_bias"),
    "o": ("self_attn.o_proj", "attention_bias"),
    "gate": ("mlp.gate_proj", "mlp_bias"),
    "up": ("mlp.up_proj", "mlp_bias"),
    "down": ("mlp.down_proj", "mlp_bias"),
}
NORMS = {"input_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm"}
EMBED, FINAL_NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


def read_rope(config: dict) -> tuple[float, str]:
    """(rope_theta, the key it came from), read by ``exporters.hf.read_rope`` from either config
    layout. Only the default (unscaled) rotary embedding is supported by this graph."""
    for key in ("rope_parameters", "rope_scaling"):  # both layouts may name a scaled rope
        block = config.get(key)
        if isinstance(block, dict) and block.get("rope_type", block.get("type", ROPE_DEFAULT)) != ROPE_DEFAULT:
            raise refuse(f"`{key}.rope_type` must be 'default' (plain rotary embedding) for the ONNX exporter",
                         block.get("rope_type", block.get("type")), "export a model without rope scaling, or "
                         "file an issue asking for this rope type")
    rope = hf_read_rope(config)
    return rope.theta, rope.source


def read_spec(config: dict) -> DecoderSpec:
    """The effective decoder hyper-parameters; PreflightError for anything the graph cannot express."""
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise refuse(f"`model_type` must be one of {MODEL_TYPES} for the Llama family", model_type,
                      "use the family that matches model_type")
    act = config.get("hidden_act", "silu")
    if act not in SUPPORTED_ACTIVATIONS:
        raise refuse(f"`hidden_act` must be one of {SUPPORTED_ACTIVATIONS}", act, "file an issue for this activation")
    hidden, heads = positive_int(config, "hidden_size"), positive_int(config, "num_attention_heads")
    kv_heads = positive_int(config, "num_key_value_heads", heads)
    if heads % kv_heads:
        raise refuse(f"`num_attention_heads` ({heads}) must be a multiple of `num_key_value_heads`", kv_heads,
                      "fix config.json")
    head_dim = config.get("head_dim") or hidden // heads
    if head_dim % 2:
        raise refuse("`head_dim` must be even for rotary embeddings", head_dim, "fix config.json")
    window = config.get("sliding_window") if model_type == "mistral" else None
    if window is not None:
        window = positive_int(config, "sliding_window")
    theta, theta_source = read_rope(config)
    return DecoderSpec(
        model_type=model_type, hidden_size=hidden, num_layers=positive_int(config, "num_hidden_layers"),
        num_heads=heads, num_kv_heads=kv_heads, head_dim=int(head_dim),
        intermediate_size=positive_int(config, "intermediate_size"), vocab_size=positive_int(config, "vocab_size"),
        max_positions=positive_int(config, "max_position_embeddings"),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=theta, rope_theta_source=theta_source,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=bool(config.get("attention_bias", False)), mlp_bias=bool(config.get("mlp_bias", False)),
        sliding_window=window,
    )


def _layer_names(i: int) -> dict[str, str]:
    """role -> tensor name for layer ``i`` (weights as ``role``, biases as ``role.bias``)."""
    prefix = f"model.layers.{i}"
    names = {role: f"{prefix}.{path}.weight" for role, (path, _) in PROJECTIONS.items()}
    names.update({role: f"{prefix}.{path}.weight" for role, path in NORMS.items()})
    names.update({f"{role}.bias": f"{prefix}.{path}.bias" for role, (path, _) in PROJECTIONS.items()})
    return names


def expected_shapes(spec: DecoderSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor name the checkpoint must hold, with its shape."""
    h, d, f = spec.hidden_size, spec.head_dim, spec.intermediate_size
    q_out, kv_out = spec.num_heads * d, spec.num_kv_heads * d
    out_in = {"q": (q_out, h), "k": (kv_out, h), "v": (kv_out, h), "o": (h, q_out),
              "gate": (f, h), "up": (f, h), "down": (h, f)}
    shapes: dict[str, tuple[int, ...]] = {EMBED: (spec.vocab_size, h), FINAL_NORM: (h,)}
    if not spec.tie_word_embeddings:
        shapes[LM_HEAD] = (spec.vocab_size, h)
    for i in range(spec.num_layers):
        names = _layer_names(i)
        for role, (_, flag) in PROJECTIONS.items():
            shapes[names[role]] = out_in[role]
            if getattr(spec, flag):
                shapes[names[f"{role}.bias"]] = (out_in[role][0],)
        for role in NORMS:
            shapes[names[role]] = (h,)
    return shapes


def load_weights(model_dir: str | Path, spec: DecoderSpec) -> DecoderWeights:
    """Check every tensor name and shape, then load them all as float32."""
    ckpt = Checkpoint(model_dir)
    ignored = {n for n in ckpt.shapes if n.endswith(IGNORED_SUFFIXES)}
    if spec.tie_word_embeddings:
        ignored.add(LM_HEAD)  # transformers re-ties it on load, whatever the file holds
    ckpt.check(expected_shapes(spec), ignored)

    layers = []
    for i in range(spec.num_layers):
        names = _layer_names(i)
        tensors = {role: ckpt.load(names[role]) for role in [*PROJECTIONS, *NORMS]}
        bias = {role: ckpt.load(names[f"{role}.bias"]) for role, (_, flag) in PROJECTIONS.items()
                if getattr(spec, flag)}
        layers.append(LayerWeights(**tensors, bias=bias))
    return DecoderWeights(
        embed=ckpt.load(EMBED), layers=layers, norm=ckpt.load(FINAL_NORM),
        lm_head=None if spec.tie_word_embeddings else ckpt.load(LM_HEAD),
    )
