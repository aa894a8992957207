"""What the family modules share: the config keys every decoder has, and a table-driven loader.

A family describes one layer's tensors as a list of ``Tensor`` rows (name under
``{prefix}.layers.{i}.``, shape, the ``LayerWeights`` field(s) it fills); ``load_decoder`` checks
every name and shape of the whole checkpoint against them (missing, extra and wrongly shaped
tensors reported separately) before loading any, then fills ``DecoderWeights``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from exporters.hf import (
    IGNORED_SUFFIXES,
    ROPE_DEFAULT,
    Checkpoint,
    positive_int,
    refuse,
)
from exporters.hf import read_rope as hf_read_rope

from . import DecoderWeights, LayerWeights

# config activation name -> the graph's name for the same function
ACTIVATION_NAMES = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_pytorch_tanh"}
SILU = ("silu", "swish")
BIAS = "bias."  # role prefix of a bias: "bias.q" fills LayerWeights.bias["q"]


def check_model_type(config: dict, model_types: tuple[str, ...], family: str) -> None:
    """PreflightError unless config.json's ``model_type`` belongs to ``family``."""
    if config.get("model_type") not in model_types:
        raise refuse(f"`model_type` must be one of {model_types} for the {family} family", config.get("model_type"),
                     "use the family that matches model_type")


def read_common(config: dict, *, act_key: str = "hidden_act", acts: tuple[str, ...] = SILU,
                head_dim_default: int | None = None) -> dict:
    """``DecoderSpec`` keyword arguments every family reads the same way (rope excluded)."""
    act = config.get(act_key, acts[0])
    if act not in acts:
        raise refuse(f"`{act_key}` must be one of {acts} for model_type {config.get('model_type')!r}", act,
                     "file an issue for this activation")
    hidden, heads = positive_int(config, "hidden_size"), positive_int(config, "num_attention_heads")
    kv_heads = positive_int(config, "num_key_value_heads", heads)
    if heads % kv_heads:
        raise refuse(f"`num_attention_heads` ({heads}) must be a multiple of `num_key_value_heads`", kv_heads,
                     "fix config.json")
    if head_dim_default is not None:
        head_dim = positive_int(config, "head_dim", head_dim_default)
    else:
        head_dim = config.get("head_dim") or hidden // heads
    if head_dim % 2:
        raise refuse("`head_dim` must be even for rotary embeddings", head_dim, "fix config.json")
    return dict(
        model_type=config["model_type"], hidden_size=hidden, num_layers=positive_int(config, "num_hidden_layers"),
        num_heads=heads, num_kv_heads=kv_heads, head_dim=int(head_dim),
        intermediate_size=positive_int(config, "intermediate_size"), vocab_size=positive_int(config, "vocab_size"),
        max_positions=positive_int(config, "max_position_embeddings"),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)), hidden_act=ACTIVATION_NAMES[act],
    )


def default_rope(config: dict) -> tuple[float, str]:
    """(rope_theta, the key it came from), read by ``exporters.hf.read_rope`` from either config
    layout; PreflightError for a scaled rope (only the plain rotary embedding is supported)."""
    for key in ("rope_parameters", "rope_scaling"):  # both layouts may name a scaled rope
        block = config.get(key)
        if isinstance(block, dict) and block.get("rope_type", block.get("type", ROPE_DEFAULT)) != ROPE_DEFAULT:
            raise refuse(f"`{key}.rope_type` must be 'default' (plain rotary embedding) for the ONNX exporter",
                         block.get("rope_type", block.get("type")), "export a model without rope scaling, or "
                         "file an issue asking for this rope type")
    rope = hf_read_rope(config)
    return rope.theta, rope.source


@dataclass(frozen=True)
class Tensor:
    """One checkpoint tensor of every layer and the ``LayerWeights`` field(s) it fills.

    Several ``roles`` split the tensor along its rows, ``rows`` giving each one's count (Phi3's
    fused ``qkv_proj``); ``plus_one`` stores ``1 + w`` for RMSNorms that scale by it (Gemma3).
    """

    name: str  # under "{prefix}.layers.{i}."
    shape: tuple[int, ...]
    roles: tuple[str, ...]
    rows: tuple[int, ...] = ()
    plus_one: bool = False

    def split(self, array: np.ndarray) -> dict[str, np.ndarray]:
        if self.plus_one:
            array = np.float32(1.0) + array
        if len(self.roles) == 1:
            return {self.roles[0]: array}
        parts = np.split(array, np.cumsum(self.rows)[:-1], axis=0)
        return {role: np.ascontiguousarray(part) for role, part in zip(self.roles, parts)}


def load_decoder(model_dir: str | Path, spec, layer_tensors: list[Tensor], *, prefix: str | tuple[str, ...] = "model",
                 lm_head: str | tuple[str, ...] = "lm_head.weight", norm_plus_one: bool = False,
                 ignore: Callable[[str], bool] = lambda name: False) -> DecoderWeights:
    """Check every tensor name and shape of the checkpoint, then load them all as float32.

    ``prefix`` / ``lm_head``: where the decoder's tensors live; given several candidates (layouts
    differ between transformers versions), the first present in the checkpoint is used.
    ``ignore``: checkpoint names deliberately not exported (a vision tower); they may be present.
    """
    ckpt = Checkpoint(model_dir)
    h = spec.hidden_size
    prefixes = (prefix,) if isinstance(prefix, str) else prefix
    prefix = next((p for p in prefixes if f"{p}.embed_tokens.weight" in ckpt.shapes), prefixes[0])
    heads = (lm_head,) if isinstance(lm_head, str) else lm_head
    lm_head = next((n for n in heads if n in ckpt.shapes), heads[0])
    embed, final_norm = f"{prefix}.embed_tokens.weight", f"{prefix}.norm.weight"
    expected: dict[str, tuple[int, ...]] = {embed: (spec.vocab_size, h), final_norm: (h,)}
    if not spec.tie_word_embeddings:
        expected[lm_head] = (spec.vocab_size, h)
    for i in range(spec.num_layers):
        expected.update({f"{prefix}.layers.{i}.{t.name}": t.shape for t in layer_tensors})
    ignored = {n for n in ckpt.shapes if n.endswith(IGNORED_SUFFIXES) or ignore(n)}
    if spec.tie_word_embeddings:
        ignored.update(heads)  # transformers re-ties it on load, whatever the file holds
    ckpt.check(expected, ignored)

    layers = []
    for i in range(spec.num_layers):
        roles: dict[str, np.ndarray] = {}
        for t in layer_tensors:
            roles.update(t.split(ckpt.load(f"{prefix}.layers.{i}.{t.name}")))
        bias = {r[len(BIAS):]: roles.pop(r) for r in list(roles) if r.startswith(BIAS)}
        layers.append(LayerWeights(**roles, bias=bias))
    norm = ckpt.load(final_norm)
    return DecoderWeights(embed=ckpt.load(embed), layers=layers, norm=np.float32(1.0) + norm if norm_plus_one else norm,
                          lm_head=None if spec.tie_word_embeddings else ckpt.load(lm_head))


def linear_tensors(spec, names: dict[str, str], biases: tuple[str, ...] = ()) -> list[Tensor]:
    """The seven projections of a Llama-style layer (``names``: role -> module path) and the
    biases of the roles in ``biases``."""
    h, d, f = spec.hidden_size, spec.head_dim, spec.intermediate_size
    q_out, kv_out = spec.num_heads * d, spec.num_kv_heads * d
    out_in = {"q": (q_out, h), "k": (kv_out, h), "v": (kv_out, h), "o": (h, q_out),
              "gate": (f, h), "up": (f, h), "down": (h, f)}
    tensors = [Tensor(f"{path}.weight", out_in[role], (role,)) for role, path in names.items()]
    tensors += [Tensor(f"{names[role]}.bias", (out_in[role][0],), (BIAS + role,)) for role in biases]
    return tensors
