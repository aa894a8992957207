"""mlc-chat-config.json: the model, tokenizer and conversation settings WebLLM loads with a model.

Fields, their order and their defaults follow what mlc-llm's ``gen_config`` writes (MLCChatConfig in
mlc-llm's protocol/mlc_chat_config.py), so a bundle reads the same in web-llm and in mlc-llm:
sampling settings come from generation_config.json, then config.json, then mlc-llm's system
defaults; tokenizer files are copied next to it and listed in ``tokenizer_files``;
``tokenizer_info`` is detected from tokenizer.json's decoder and normalizer as mlc-llm does.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from toolchain.core.errors import PreflightError
from toolchain.core.files import write_bytes_atomic

from .conv_template import PLACEHOLDER, derive_conv_template

CHAT_CONFIG_FILE = "mlc-chat-config.json"
CHAT_CONFIG_VERSION = "0.1.0"  # mlc-llm's MLC_CHAT_CONFIG_VERSION
MAX_DEFAULT_PREFILL_CHUNK = 8192  # mlc-llm model configs: prefill_chunk_size defaults to min(context, 8192)
NOT_SET = -1  # mlc-llm writes -1 for sliding_window_size / attention_sink_size a model does not use

# Files copied when present, in mlc-llm's order (TOKENIZER_FILES in its gen_config.py)
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "vocab.json", "merges.txt", "added_tokens.json",
                   "tokenizer_config.json")

# Sampling and token-id fields taken from generation_config.json, then config.json, else these
# (MLC_CHAT_SYSTEM_DEFAULT in mlc-llm)
SYSTEM_DEFAULTS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "temperature": 1.0,
                   "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "top_p": 1.0}
SAMPLING_FIELDS = ("temperature", "presence_penalty", "frequency_penalty", "repetition_penalty", "top_p")
TOKEN_ID_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id")

# tokenizer_info detection (mlc-llm's Tokenizer::DetectTokenizerInfo)
POSTPROC_BY_DECODER = {"ByteLevel": "byte_level", "ByteFallback": "byte_fallback"}
DEFAULT_POSTPROC = "byte_fallback"
SPM_SPACE = "\u2581"

# Required conv_template keys with the type web-llm expects; the rest get mlc-llm's defaults.
CONV_REQUIRED = {"system_template": str, "system_message": str, "roles": dict, "seps": list, "stop_str": list,
                 "stop_token_ids": list}
CONV_DEFAULTS = {"name": None, "system_prefix_token_ids": None, "add_role_after_system_message": True,
                 "role_templates": {}, "messages": [], "role_content_sep": "", "role_empty_sep": "",
                 "function_string": "", "use_function_calling": False}
CONV_ORDER = ("name", "system_template", "system_message", "system_prefix_token_ids", "add_role_after_system_message",
              "roles", "role_templates", "messages", "seps", "role_content_sep", "role_empty_sep", "stop_str",
              "stop_token_ids", "function_string", "use_function_calling")


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PreflightError(f"{path}: not valid JSON: {exc} (fix: restore the file from the model source)") from None


def _decoder_steps(node: dict | None) -> list[dict]:
    if not isinstance(node, dict):
        return []
    if node.get("type") == "Sequence":
        return [step for step in node.get("decoders", node.get("normalizers", [])) if isinstance(step, dict)]
    return [node]


def tokenizer_info(tokenizer_json: Path) -> dict:
    """token_postproc_method, prepend_space_in_encode, strip_space_in_decode of a tokenizer.json, detected
    the way mlc-llm does it (defaults when the file is missing)."""
    info = {"token_postproc_method": DEFAULT_POSTPROC, "prepend_space_in_encode": False, "strip_space_in_decode": False}
    tj = _read_json(tokenizer_json)
    decoders = _decoder_steps(tj.get("decoder"))
    for step in decoders:  # mlc-llm: the last ByteLevel/ByteFallback step of the decoder wins
        if step.get("type") in POSTPROC_BY_DECODER:
            info["token_postproc_method"] = POSTPROC_BY_DECODER[step["type"]]
    normalizer = tj.get("normalizer")
    steps = normalizer.get("normalizers", []) if isinstance(normalizer, dict) and normalizer.get("type") == "Sequence" \
        else [normalizer]
    info["prepend_space_in_encode"] = any(isinstance(s, dict) and s.get("type") == "Prepend"
                                          and s.get("prepend") == SPM_SPACE for s in steps)
    info["strip_space_in_decode"] = any(s.get("type") == "Strip" and s.get("content") == " " and s.get("start") == 1
                                        and s.get("stop") == 0 for s in decoders)
    return info


def check_conv_template(conv: dict, where: str = "recipe: webllm.conv_template") -> dict:
    """A conv_template given explicitly, checked and completed with mlc-llm's defaults (key order as it writes)."""
    if not isinstance(conv, dict):
        raise PreflightError(f"{where}: must be a mapping in mlc-llm's conv_template schema, got {type(conv).__name__} "
                             f"(fix: give system_template, system_message, roles, seps, stop_str, stop_token_ids)")
    problems = [f"{key} must be a {kind.__name__}" for key, kind in CONV_REQUIRED.items()
                if not isinstance(conv.get(key), kind)]
    if isinstance(conv.get("roles"), dict) and not {"user", "assistant"} <= set(conv["roles"]):
        problems.append("roles must name 'user' and 'assistant'")
    if isinstance(conv.get("seps"), list) and not 1 <= len(conv["seps"]) <= 2:
        problems.append("seps must hold 1 or 2 strings")
    if isinstance(conv.get("system_template"), str) and PLACEHOLDER["system"] not in conv["system_template"]:
        problems.append(f"system_template must contain {PLACEHOLDER['system']}")
    if problems:
        raise PreflightError(f"{where}: {'; '.join(problems)}, got {conv!r} (fix: follow mlc-llm's conv_template "
                             f"schema, e.g. the conv_template of a generated mlc-chat-config.json)")
    full = {key: conv.get(key, CONV_DEFAULTS.get(key)) for key in CONV_ORDER}
    full["role_templates"] = {"user": PLACEHOLDER["user"], "assistant": PLACEHOLDER["assistant"],
                              "tool": PLACEHOLDER["tool"], **(conv.get("role_templates") or {})}
    full.update({k: v for k, v in conv.items() if k not in full})  # e.g. web-llm's render_empty_system_message
    return full


def _positive(value, where: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise PreflightError(f"{where}: {what} must be a positive integer, got {value!r} (fix: give a whole number "
                             f"of tokens such as 2048)")
    return value


def _copy_tokenizer(model_dir: Path, out_dir: Path) -> list[str]:
    files = []
    for name in TOKENIZER_FILES:
        src = model_dir / name
        if src.exists():
            write_bytes_atomic(out_dir / name, src.read_bytes())
            files.append(name)
    if "tokenizer.json" not in files and "tokenizer.model" in files:
        # like mlc-llm: prefer JSON, converted with transformers' fast tokenizer
        from transformers import AutoTokenizer

        fast = AutoTokenizer.from_pretrained(str(model_dir), use_fast=True)
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            fast.backend_tokenizer.save(str(Path(tmp) / "tokenizer.json"))
            write_bytes_atomic(out_dir / "tokenizer.json", (Path(tmp) / "tokenizer.json").read_bytes())
        files.append("tokenizer.json")
    if "tokenizer.json" not in files:
        raise PreflightError(f"{model_dir}: no tokenizer.json or tokenizer.model; WebLLM needs one of them (fix: save "
                             f"the tokenizer with save_pretrained into the model folder)")
    return files


def _active_vocab_size(model_dir: Path, vocab_size: int) -> int:
    try:
        from transformers import AutoTokenizer

        return len(AutoTokenizer.from_pretrained(str(model_dir)))
    except Exception:  # noqa: BLE001 - mlc-llm also keeps vocab_size when the tokenizer cannot be loaded
        return vocab_size


def write_chat_config(model_dir: Path, out_dir: Path, *, model_type: str, quant: str, model_config: dict,
                      context_window_size: int | None = None, prefill_chunk_size: int | None = None,
                      conv_template: dict | None = None) -> dict:
    """Write ``out_dir/mlc-chat-config.json`` and copy the tokenizer files next to it; returns the config.

    ``model_config`` is mlc-llm's model config for the architecture (as the family module builds it);
    the context window and prefill chunk given here override its values, in it and at the top level.
    ``conv_template`` (mlc-llm's schema) replaces the one derived from the HF chat template."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    where = f"{model_dir}/config.json"
    hf_config = _read_json(model_dir / "config.json")
    model_config = dict(model_config)

    window = context_window_size
    if window is None:
        window = model_config.get("context_window_size") or hf_config.get("max_position_embeddings")
    window = _positive(window, where if context_window_size is None else "webllm target", "context_window_size")
    chunk = prefill_chunk_size
    if chunk is None:
        chunk = model_config.get("prefill_chunk_size") or min(window, MAX_DEFAULT_PREFILL_CHUNK)
        chunk = min(chunk, window)  # mlc-llm lowers a chunk larger than the window
    chunk = _positive(chunk, "webllm target", "prefill_chunk_size")
    if chunk > window:
        raise PreflightError(f"webllm target: prefill_chunk_size must not exceed context_window_size ({window}), got "
                             f"{chunk} (fix: lower prefill_chunk_size or raise context_window_size)")
    for key, value in (("context_window_size", window), ("prefill_chunk_size", chunk)):
        if key in model_config:
            model_config[key] = value
    vocab_size = model_config.get("vocab_size", hf_config.get("vocab_size"))
    vocab_size = _positive(vocab_size, where, "vocab_size")

    conv = check_conv_template(conv_template) if conv_template is not None else derive_conv_template(model_dir)
    files = _copy_tokenizer(model_dir, out_dir)

    generation = _read_json(model_dir / "generation_config.json")
    settings = {}
    for key in SAMPLING_FIELDS + TOKEN_ID_FIELDS:
        value = next((src[key] for src in (generation, hf_config) if src.get(key) is not None), None)
        settings[key] = SYSTEM_DEFAULTS[key] if value is None else value

    config = {
        "version": CHAT_CONFIG_VERSION,
        "model_type": model_type,
        "quantization": quant,
        "model_config": model_config,
        "vocab_size": vocab_size,
        "context_window_size": window,
        "sliding_window_size": model_config.get("sliding_window_size", NOT_SET),
        "prefill_chunk_size": chunk,
        "attention_sink_size": model_config.get("attention_sink_size", NOT_SET),
        "tensor_parallel_shards": model_config.get("tensor_parallel_shards", 1),
        "pipeline_parallel_stages": model_config.get("pipeline_parallel_stages", 1),
        "active_vocab_size": _active_vocab_size(model_dir, vocab_size),
        **{key: settings[key] for key in SAMPLING_FIELDS},
        "tokenizer_files": files,
        "tokenizer_info": tokenizer_info(out_dir / "tokenizer.json"),
        "conv_template": conv,
        **{key: settings[key] for key in TOKEN_ID_FIELDS},
    }
    write_bytes_atomic(out_dir / CHAT_CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode("utf-8"))
    return config
