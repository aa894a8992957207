"""What every MLC family shares: parameter records, config helpers and the checkpoint check (``plan``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from exporters.hf import IGNORED_SUFFIXES, TensorMismatchError, read_rope, refuse

# the role of a parameter decides whether a quantisation touches it
LINEAR, EMBEDDING, LM_HEAD, NORM, BIAS = "linear", "embedding", "lm_head", "norm", "bias"
QUANTISABLE = (LINEAR, EMBEDDING, LM_HEAD)
HF_EMBED, HF_FINAL_NORM, HF_LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
ROPE_DEFAULT = "default"


@dataclass(frozen=True)
class Param:
    """One MLC parameter before quantisation (HF layout ``[out, in]`` for matrices)."""

    name: str  # "model.layers.0.self_attn.qkv_proj.weight"
    shape: tuple[int, ...]
    role: str  # LINEAR | EMBEDDING | LM_HEAD | NORM | BIAS
    sources: tuple[str, ...]  # HF tensors concatenated along axis 0, in this order


@dataclass(frozen=True)
class Family:
    """One architecture as mlc-llm models it."""

    name: str  # mlc-llm's model_type ("llama", "qwen2")
    architectures: tuple[str, ...]  # HF `architectures` entries it takes
    hf_model_types: tuple[str, ...]  # HF `model_type` values it takes
    model_config: Callable[..., dict]
    params: Callable[[dict], list]
    notes: dict = field(default_factory=dict)

    @property
    def model_type(self) -> str:
        """mlc-llm's ``model_type`` (mlc-chat-config.json), the same as ``name``."""
        return self.name

    def skipped(self, model_config: dict, hf_names) -> dict[str, str]:
        out = {n: "rotary buffer mlc-llm marks unused" for n in hf_names if n.endswith(IGNORED_SUFFIXES)}
        if model_config["tie_word_embeddings"] and HF_LM_HEAD in hf_names:
            out[HF_LM_HEAD] = "tied to the token embedding (mlc-llm has no lm_head parameter then)"
        return out


# --- config helpers shared by the families ---------------------------------------------------

def effective_rope_theta(hf_config: dict) -> float:
    """rope_theta from either config layout (transformers 5 keeps it under rope_parameters)."""
    rope = read_rope(hf_config)
    if rope.rope_type != ROPE_DEFAULT:
        raise refuse(f"the WebLLM exporter supports only the plain rotary embedding (rope_type "
                     f"{ROPE_DEFAULT!r})", rope.rope_type, "export this model to another target, or file an issue "
                     "asking for this rope scaling in the WebLLM exporter")
    theta = rope.theta
    return int(theta) if float(theta).is_integer() else theta


def context_window(hf_config: dict) -> int:
    for key in ("max_position_embeddings", "max_sequence_length"):
        value = hf_config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    raise refuse("config.json must give the context length as `max_position_embeddings` or "
                 "`max_sequence_length`", None, "add max_position_embeddings to config.json")


def apply_overrides(cfg: dict, overrides: dict, prefill_cap: int) -> dict:
    """mlc-llm's ModelConfigOverride followed by its config's ``__post_init__`` rules."""
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in cfg:
            raise ValueError(f"model_config has no field {key!r} to override")
        cfg[key] = value
    if not cfg["prefill_chunk_size"]:
        cfg["prefill_chunk_size"] = min(cfg["context_window_size"], prefill_cap)
    elif cfg["prefill_chunk_size"] > cfg["context_window_size"]:
        cfg["prefill_chunk_size"] = min(cfg["context_window_size"], prefill_cap)
    return cfg


def check_heads(heads: int, kv_heads: int) -> None:
    if heads % kv_heads:
        raise refuse(f"`num_attention_heads` ({heads}) must be a multiple of `num_key_value_heads`", kv_heads,
                     "fix config.json")


def decoder_params(cfg: dict, layer: Callable[[int], list[Param]]) -> list[Param]:
    """embed_tokens, every layer, the final norm, and lm_head unless tied (mlc-llm's module order)."""
    v, h = cfg["vocab_size"], cfg["hidden_size"]
    out = [Param("model.embed_tokens.weight", (v, h), EMBEDDING, (HF_EMBED,))]
    for i in range(cfg["num_hidden_layers"]):
        out += layer(i)
    out.append(Param("model.norm.weight", (h,), NORM, (HF_FINAL_NORM,)))
    if not cfg["tie_word_embeddings"]:
        out.append(Param("lm_head.weight", (v, h), LM_HEAD, (HF_LM_HEAD,)))
    return out


def source_shapes(params: list[Param], cfg: dict) -> dict[str, tuple[int, ...]]:
    """The shape each HF source tensor must have (fused parameters split back by rows)."""
    d = cfg["head_dim"]
    q, kv, f = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d, cfg["intermediate_size"]
    rows = {"q_proj": q, "k_proj": kv, "v_proj": kv, "gate_proj": f, "up_proj": f}
    out = {}
    for p in params:
        if len(p.sources) == 1:
            out[p.sources[0]] = p.shape
            continue
        for src in p.sources:
            proj = src.split(".")[-2]
            out[src] = (rows[proj], *p.shape[1:])
    return out


def plan(family: Family, model_config: dict, shapes: dict[str, tuple[int, ...]], where: str = "checkpoint"):
    """Every MLC parameter, after checking each source name and shape against ``shapes``.

    Returns ``(params, skipped)``; raises TensorMismatchError (missing / extra / wrong shape).
    """
    params = family.params(model_config)
    expected = source_shapes(params, model_config)
    skipped = family.skipped(model_config, set(shapes))
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected) - set(skipped))
    wrong = [(n, expected[n], tuple(shapes[n])) for n in sorted(set(expected) & set(shapes))
             if tuple(expected[n]) != tuple(shapes[n])]
    if missing or extra or wrong:
        raise TensorMismatchError(where, missing, extra, wrong)
    return params, skipped
