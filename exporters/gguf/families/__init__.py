"""Model families for the GGUF writer: hyper-parameters and the HF -> GGUF tensor mapping.

A family module knows one architecture's config keys and tensor names and nothing about the
file format. It exposes:

- ``MODEL_TYPES`` and ``ARCH`` (a ``gguf.MODEL_ARCH``);
- ``read_hparams(config) -> Hparams``, raising PreflightError for anything llama.cpp's
  implementation of the architecture cannot express;
- ``tensor_entries(hp, names) -> list[Entry]``: every tensor to export, with the Hugging Face
  name and shape it comes from and the transform into llama.cpp's layout (``names`` are the
  checkpoint's tensor names, for families whose prefix varies);
- ``skipped(hp, names) -> dict[str, str]``: checkpoint tensors deliberately not exported, with
  the reason (a tied ``lm_head``, a vision tower);
- ``write_hparams(writer, hp)``: the family's GGUF keys beyond ``write_common_hparams``;
- ``extra_tensors(hp) -> list[(gguf_name, array)]``: tensors computed from the config.

``plan_tensors`` checks every name and shape against the checkpoint (missing and extra reported
separately) and every GGUF name against the tensors llama.cpp knows for the architecture.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Callable

import gguf
import numpy as np

from exporters.hf import (  # noqa: F401
    IGNORED_SUFFIXES,
    Checkpoint,
    Rope,
    TensorMismatchError,
    positive_int,
    read_config,
    read_rope,
    refuse,
)
from toolchain.core.errors import PreflightError, StageError

from ..tables import ROPE_LINEAR, SUPPORTED_ARCHITECTURES

__all__ = ["Checkpoint", "Entry", "Hparams", "TensorMismatchError", "family_for", "read_config"]

def family_for(model_type: str | None) -> ModuleType:
    """The family module for ``model_type``, or a PreflightError saying what is supported."""
    if model_type not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(map(repr, sorted(SUPPORTED_ARCHITECTURES)))
        raise PreflightError(
            f"config.json: the GGUF exporter supports model_type {supported}; this model is {model_type!r} "
            f"(fix: choose another export target for this model, or file an issue asking for {model_type!r} "
            f"support in the GGUF exporter)")
    return importlib.import_module(f"{__name__}.{SUPPORTED_ARCHITECTURES[model_type]}")


@dataclass
class Hparams:
    """The effective hyper-parameters of a decoder, as the GGUF file records them."""

    model_type: str
    arch: str  # GGUF general.architecture
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    context_length: int
    rms_norm_eps: float
    rope: Rope
    rope_dims: int
    tie_word_embeddings: bool
    extra: dict = field(default_factory=dict)  # family-specific values, also reported

    def to_dict(self) -> dict:
        out = asdict(self)
        rope = out.pop("rope")
        out.update(rope_theta=rope["theta"], rope_theta_source=rope["source"], rope_type=rope["rope_type"])
        out.update(out.pop("extra"))
        return out


def read_common(config: dict, arch: gguf.MODEL_ARCH, *, act_key: str = "hidden_act",
                acts: tuple[str, ...] = ("silu", "swish"), rope: Rope | None = None) -> Hparams:
    """The hyper-parameters every supported decoder shares; PreflightError when out of range."""
    act = config.get(act_key, acts[0])
    if act not in acts:
        raise refuse(f"`{act_key}` must be one of {acts} for llama.cpp's {gguf.MODEL_ARCH_NAMES[arch]} "
                     f"architecture", act, "file an issue for this activation")
    hidden, heads = positive_int(config, "hidden_size"), positive_int(config, "num_attention_heads")
    kv_heads = positive_int(config, "num_key_value_heads", heads)
    if heads % kv_heads:
        raise refuse(f"`num_attention_heads` ({heads}) must be a multiple of `num_key_value_heads`", kv_heads,
                     "fix config.json")
    head_dim = config.get("head_dim") or hidden // heads
    rope = rope or read_rope(config)
    return Hparams(
        model_type=config["model_type"], arch=gguf.MODEL_ARCH_NAMES[arch], hidden_size=hidden,
        num_layers=positive_int(config, "num_hidden_layers"), num_heads=heads, num_kv_heads=kv_heads,
        head_dim=int(head_dim), intermediate_size=positive_int(config, "intermediate_size"),
        vocab_size=positive_int(config, "vocab_size"),
        context_length=positive_int(config, "max_position_embeddings"),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)), rope=rope, rope_dims=int(head_dim),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)))


def require_head_dim_product(hp: Hparams) -> None:
    """Architectures whose llama.cpp loader sizes the query projection as ``n_embd``."""
    if hp.head_dim * hp.num_heads != hp.hidden_size:
        raise refuse(f"`head_dim` x `num_attention_heads` must equal `hidden_size` ({hp.hidden_size}) for "
                     f"llama.cpp's {hp.arch} architecture", hp.head_dim, "export a model with the standard head size")


def write_common_hparams(writer: gguf.GGUFWriter, hp: Hparams) -> None:
    writer.add_context_length(hp.context_length)
    writer.add_embedding_length(hp.hidden_size)
    writer.add_block_count(hp.num_layers)
    writer.add_feed_forward_length(hp.intermediate_size)
    writer.add_head_count(hp.num_heads)
    writer.add_head_count_kv(hp.num_kv_heads)
    writer.add_key_length(hp.head_dim)
    writer.add_value_length(hp.head_dim)
    writer.add_layer_norm_rms_eps(hp.rms_norm_eps)
    writer.add_rope_freq_base(hp.rope.theta)
    writer.add_rope_dimension_count(hp.rope_dims)
    writer.add_vocab_size(hp.vocab_size)


# --- tensors ----------------------------------------------------------------------------------

Transform = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Entry:
    """One GGUF tensor: where it comes from, its shape (numpy order, HF ``[out, in]``), its transform."""

    gguf_name: str  # "blk.3.attn_q.weight"
    hf_name: str  # "model.layers.3.self_attn.q_proj.weight"
    shape: tuple[int, ...]
    transform: Transform | None = None


def gguf_name(tensor: gguf.MODEL_TENSOR, bid: int | None = None, suffix: str = "weight") -> str:
    base = gguf.TENSOR_NAMES[tensor]
    return f"{base.format(bid=bid) if bid is not None else base}.{suffix}"


def layer_entries(hp: Hparams, prefix: str, table: list[tuple]) -> list[Entry]:
    """Expand a per-layer table of ``(hf_suffix, MODEL_TENSOR, gguf_suffix, shape, transform)``."""
    out = []
    for i in range(hp.num_layers):
        for hf_suffix, tensor, suffix, shape, transform in table:
            out.append(Entry(gguf_name(tensor, i, suffix), f"{prefix}.layers.{i}.{hf_suffix}", tuple(shape), transform))
    return out


def plan_tensors(family: ModuleType, hp: Hparams, ckpt: Checkpoint) -> tuple[list[Entry], dict[str, str]]:
    """Every tensor to write, after checking each name and shape against the checkpoint.

    Raises TensorMismatchError listing missing, extra and wrongly shaped tensors separately.
    Returns the entries and the checkpoint tensors skipped on purpose (name -> reason).
    """
    names = set(ckpt.shapes)
    entries = family.tensor_entries(hp, names)
    skipped = {n: "buffer transformers ignores" for n in names if n.endswith(IGNORED_SUFFIXES)}
    skipped.update(family.skipped(hp, names))
    expected = {e.hf_name: e.shape for e in entries}
    ckpt.check(expected, set(skipped))
    check_gguf_names(family.ARCH, [e.gguf_name for e in entries])
    return entries, {n: r for n, r in skipped.items() if n in names}


HF_EMBED, HF_FINAL_NORM, HF_LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


def decoder_entries(hp: Hparams, layer_table: list[tuple], prefix: str = "model") -> list[Entry]:
    """The usual decoder: token embedding, every layer of ``layer_table``, final norm, and the
    output head unless tied (llama.cpp reuses ``token_embd`` when ``output`` is absent)."""
    v, h = hp.vocab_size, hp.hidden_size
    entries = [Entry(gguf_name(gguf.MODEL_TENSOR.TOKEN_EMBD), HF_EMBED, (v, h))]
    entries += layer_entries(hp, prefix, layer_table)
    entries.append(Entry(gguf_name(gguf.MODEL_TENSOR.OUTPUT_NORM), HF_FINAL_NORM, (h,)))
    if not hp.tie_word_embeddings:
        entries.append(Entry(gguf_name(gguf.MODEL_TENSOR.OUTPUT), HF_LM_HEAD, (v, h)))
    return entries


def write_hparams_linear_rope(writer: gguf.GGUFWriter, hp: Hparams) -> None:
    """The common keys, plus linear rope scaling when the config asks for it."""
    write_common_hparams(writer, hp)
    if hp.rope.rope_type == ROPE_LINEAR:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(hp.rope.params["factor"]))


def skipped_tied_head(hp: Hparams, names: set[str]) -> dict[str, str]:
    return {HF_LM_HEAD: "tied to the token embedding"} if hp.tie_word_embeddings else {}


def check_gguf_names(arch: gguf.MODEL_ARCH, names: list[str]) -> None:
    """Every name must be one llama.cpp knows for ``arch``, and none may repeat (a mapping bug)."""
    known = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch]}
    patterns = {k for k in known if "{bid}" in k}
    unknown, seen, repeated = [], set(), []
    for name in names:
        base = name.rsplit(".", 1)[0]
        parts = base.split(".")
        generic = ".".join(["blk", "{bid}", *parts[2:]]) if parts[0] == "blk" else base
        if base not in known and generic not in patterns:
            unknown.append(name)
        if name in seen:
            repeated.append(name)
        seen.add(name)
    if unknown or repeated:
        raise StageError(f"internal error in the GGUF {gguf.MODEL_ARCH_NAMES[arch]} mapping: unknown tensor names "
                         f"{unknown}, repeated {repeated} (fix: report this as a bug)")


def rope_interleave(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a q/k projection (or bias) from rotate-half order to llama.cpp's pairwise order.

    Hugging Face Llama rotates dimension i with i + d/2 in each head; llama.cpp's LLAMA graph
    (rope type NORM) rotates adjacent pairs (2i, 2i+1). Row j of half h of a head moves to 2j + h.
    """
    head_dim = weight.shape[0] // n_heads
    return (weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def add_one(weight: np.ndarray) -> np.ndarray:
    """Gemma's RMSNorm multiplies by (1 + weight); llama.cpp's by weight."""
    return weight + np.float32(1.0)


def llama3_rope_factors(hp: Hparams) -> np.ndarray:
    """The per-frequency divisors of Llama 3.1's rope scaling, as llama.cpp's rope_freqs tensor."""
    p = hp.rope.params
    factor = float(p.get("factor", 8.0))
    low, high = float(p.get("low_freq_factor", 1.0)), float(p.get("high_freq_factor", 4.0))
    old_ctx = float(p.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for i in range(0, hp.rope_dims, 2):
        wavelen = 2 * math.pi * hp.rope.theta ** (i / hp.rope_dims)
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1.0 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)
