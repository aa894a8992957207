"""Gemma3 family for GGUF: Gemma3ForCausalLM (``gemma3_text``) and the text tower of
Gemma3ForConditionalGeneration (``gemma3``; the vision tower and projector are skipped).

What differs from Llama, and how llama.cpp's GEMMA3 graph expects it:
- every RMSNorm (layer norms, q/k norms, final norm) multiplies by ``1 + weight`` in Hugging
  Face and by ``weight`` in llama.cpp, so 1 is added to each norm weight;
- the token embedding is scaled by sqrt(hidden_size) inside llama.cpp, as in Hugging Face, so
  the tensor is written unchanged;
- rope is NEOX (rotate-half), Hugging Face's layout: q and k are written as they are;
- local (sliding) layers use their own rope base; the per-layer pattern is written as an array;
- the attention scale is fixed by llama.cpp (1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the
  62-layer 27B), so a ``query_pre_attn_scalar`` that disagrees is refused.
"""
from __future__ import annotations

import gguf

from ..tables import ROPE_DEFAULT, ROPE_LINEAR
from . import (
    Entry,
    Hparams,
    add_one,
    gguf_name,
    layer_entries,
    positive_int,
    read_common,
    read_rope,
    refuse,
    write_common_hparams,
)

MODEL_TYPES = ("gemma3_text", "gemma3")
ARCH = gguf.MODEL_ARCH.GEMMA3
T = gguf.MODEL_TENSOR
ROPE_TYPES = (ROPE_DEFAULT, ROPE_LINEAR)
GLOBAL_ROPE_THETA, LOCAL_ROPE_THETA = 1_000_000.0, 10_000.0  # transformers' Gemma3 defaults
DEFAULT_SLIDING_PATTERN = 6  # every 6th layer attends globally (transformers' default)
LLAMA_CPP_27B_LAYERS = 62  # llama.cpp scales attention by hidden/heads only for this size
# where the text model's tensors live: Gemma3ForCausalLM, transformers 5 and 4 multimodal layouts
PREFIXES = ("model", "model.language_model", "language_model.model")
LM_HEAD_NAMES = ("lm_head.weight", "language_model.lm_head.weight")


def _text_config(config: dict) -> dict:
    if config.get("model_type") == "gemma3":
        text = dict(config.get("text_config") or {})
        text.setdefault("tie_word_embeddings", config.get("tie_word_embeddings", True))
        text["model_type"] = "gemma3"
        return text
    return config


def read_hparams(config: dict) -> Hparams:
    config = dict(_text_config(config))
    config.setdefault("tie_word_embeddings", True)  # Gemma3's default
    rope = read_rope(config, "full_attention", default_theta=GLOBAL_ROPE_THETA)
    hp = read_common(config, ARCH, act_key="hidden_activation", acts=("gelu_pytorch_tanh",), rope=rope)
    hp.head_dim = hp.rope_dims = positive_int(config, "head_dim", 256)
    if rope.rope_type not in ROPE_TYPES or (rope.rope_type == ROPE_LINEAR and not rope.params.get("factor")):
        raise refuse(f"global rope type must be one of {ROPE_TYPES} (linear with a `factor`) for the GGUF gemma3 "
                     f"architecture", rope.rope_type, "file an issue asking for this rope scaling")
    params = config.get("rope_parameters") or {}
    if isinstance(params.get("sliding_attention"), dict):
        local = read_rope(config, "sliding_attention", default_theta=LOCAL_ROPE_THETA)
        if local.rope_type != ROPE_DEFAULT:
            raise refuse("local (sliding) rope must be unscaled for llama.cpp's gemma3", local.rope_type,
                         "file an issue asking for this rope scaling")
        local_theta = local.theta
    else:
        local_theta = float(config.get("rope_local_base_freq", LOCAL_ROPE_THETA))
    for key in ("attn_logit_softcapping",):
        if config.get(key) is not None:
            raise refuse(f"`{key}` must be null (llama.cpp's gemma3 has none)", config[key], "fix config.json")
    if config.get("use_bidirectional_attention"):
        raise refuse("`use_bidirectional_attention` must be false for a causal GGUF model", True,
                     "export the causal (generation) model")
    expected_scalar = (hp.hidden_size // hp.num_heads if hp.num_layers == LLAMA_CPP_27B_LAYERS else hp.head_dim)
    scalar = config.get("query_pre_attn_scalar", 256)
    if scalar != expected_scalar:
        raise refuse(f"`query_pre_attn_scalar` must be {expected_scalar} for llama.cpp's gemma3 (it scales "
                     f"attention by 1/sqrt(head_dim), or by 1/sqrt(hidden/heads) for 62 layers)", scalar,
                     "export a model whose attention scale llama.cpp reproduces")
    window = config.get("sliding_window")
    layer_types = config.get("layer_types")
    if layer_types is None:
        pattern = config.get("sliding_window_pattern", config.get("_sliding_window_pattern", DEFAULT_SLIDING_PATTERN))
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(hp.num_layers)]
    if len(layer_types) != hp.num_layers or set(layer_types) - {"sliding_attention", "full_attention"}:
        raise refuse(f"`layer_types` must list 'sliding_attention' or 'full_attention' for each of the "
                     f"{hp.num_layers} layers", layer_types, "fix config.json")
    hp.extra.update(sliding_window=window, swa_layers=[t == "sliding_attention" for t in layer_types],
                    rope_theta_swa=local_theta, final_logit_softcapping=config.get("final_logit_softcapping"),
                    query_pre_attn_scalar=scalar, embedding_scale=hp.hidden_size ** 0.5)
    return hp


def _prefix(names: set[str]) -> str:
    for prefix in PREFIXES:
        if f"{prefix}.embed_tokens.weight" in names:
            return prefix
    return PREFIXES[0]  # reported as missing tensors by the checker


def tensor_entries(hp: Hparams, names: set[str]) -> list[Entry]:
    v, h, f, d = hp.vocab_size, hp.hidden_size, hp.intermediate_size, hp.head_dim
    q_out, kv_out = hp.num_heads * d, hp.num_kv_heads * d
    table = [
        ("input_layernorm.weight", T.ATTN_NORM, "weight", (h,), add_one),
        ("self_attn.q_proj.weight", T.ATTN_Q, "weight", (q_out, h), None),
        ("self_attn.k_proj.weight", T.ATTN_K, "weight", (kv_out, h), None),
        ("self_attn.v_proj.weight", T.ATTN_V, "weight", (kv_out, h), None),
        ("self_attn.q_norm.weight", T.ATTN_Q_NORM, "weight", (d,), add_one),
        ("self_attn.k_norm.weight", T.ATTN_K_NORM, "weight", (d,), add_one),
        ("self_attn.o_proj.weight", T.ATTN_OUT, "weight", (h, q_out), None),
        ("post_attention_layernorm.weight", T.ATTN_POST_NORM, "weight", (h,), add_one),
        ("pre_feedforward_layernorm.weight", T.FFN_PRE_NORM, "weight", (h,), add_one),
        ("mlp.gate_proj.weight", T.FFN_GATE, "weight", (f, h), None),
        ("mlp.up_proj.weight", T.FFN_UP, "weight", (f, h), None),
        ("mlp.down_proj.weight", T.FFN_DOWN, "weight", (h, f), None),
        ("post_feedforward_layernorm.weight", T.FFN_POST_NORM, "weight", (h,), add_one),
    ]
    prefix = _prefix(names)
    entries = [Entry(gguf_name(T.TOKEN_EMBD), f"{prefix}.embed_tokens.weight", (v, h))]
    entries += layer_entries(hp, prefix, table)
    entries.append(Entry(gguf_name(T.OUTPUT_NORM), f"{prefix}.norm.weight", (h,), add_one))
    if not hp.tie_word_embeddings:
        head = next((n for n in LM_HEAD_NAMES if n in names), LM_HEAD_NAMES[0])
        entries.append(Entry(gguf_name(T.OUTPUT), head, (v, h)))
    return entries


def skipped(hp: Hparams, names: set[str]) -> dict[str, str]:
    out = {n: "tied to the token embedding" for n in LM_HEAD_NAMES} if hp.tie_word_embeddings else {}
    if hp.model_type == "gemma3":
        prefix = _prefix(names)
        out.update({n: "vision tower / projector (the GGUF holds the text model only)" for n in names
                    if not n.startswith(prefix + ".") and n not in LM_HEAD_NAMES})
    return out


def write_hparams(writer: gguf.GGUFWriter, hp: Hparams) -> None:
    write_common_hparams(writer, hp)
    window = hp.extra["sliding_window"]
    if window and any(hp.extra["swa_layers"]):
        writer.add_sliding_window(int(window))
        writer.add_sliding_window_pattern(hp.extra["swa_layers"])
        writer.add_rope_freq_base_swa(hp.extra["rope_theta_swa"])
    if hp.extra["final_logit_softcapping"]:
        writer.add_final_logit_softcapping(float(hp.extra["final_logit_softcapping"]))
    if hp.rope.rope_type == ROPE_LINEAR:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(hp.rope.params["factor"]))


def extra_tensors(hp: Hparams) -> list:
    return []
