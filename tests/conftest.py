"""Shared fixtures: tiny random models written at test time (no weights in git, no hub)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def build_tokenizer(out: Path, texts: list[str], vocab_size: int = 512):
    """A small byte-level BPE tokenizer with ChatML special tokens, trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(out)
    return fast


def build_tiny_llama(out: Path, tokenizer, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                     tie: bool = True, seed: int = 0) -> Path:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=512, rope_theta=100000.0, tie_word_embeddings=tie,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(out)
    GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                     pad_token_id=cfg.pad_token_id).save_pretrained(out)
    return out


def spread_weights(hf_dir: Path, seed: int = 1) -> None:
    """Re-draw a tiny Llama's weights at unit scale. At the default init (std 0.02) a tiny model just
    repeats its last input token, so a broken KV cache or mask would still match greedy output;
    with unit-variance layers the continuation depends on the whole context."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:  # embeddings: std 1; linears: std 1/sqrt(fan_in), variance preserving
                std = 1.0 if "embed_tokens" in name else p.shape[1] ** -0.5
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    model.save_pretrained(hf_dir)


def build_spread_llama(out: Path, texts: list[str]):
    """A tiny untied Llama with unit-scale weights and a ChatML tokenizer saved the way edgesmith
    saves models (chat template inside tokenizer_config.json); returns the tokenizer."""
    from toolchain.core.models import patch_config, save_tokenizer

    tok = build_tokenizer(out, texts)
    build_tiny_llama(out, tok, tie=False)
    spread_weights(out)
    save_tokenizer(tok, out)
    patch_config(out)
    return tok


def browser_tools_or_skip() -> None:
    """Skip when node, chromium or web/node_modules are missing, unless EDGESMITH_REQUIRE_BROWSER
    is set (CI sets it: there a missing browser is a broken install, not a reason to skip)."""
    import os

    from runtimes.browser_runtime import missing_tools

    missing = missing_tools()
    if missing and os.environ.get("EDGESMITH_REQUIRE_BROWSER"):
        pytest.fail(f"EDGESMITH_REQUIRE_BROWSER is set but the browser runtime lacks: {'; '.join(missing)}")
    if missing:
        pytest.skip(f"browser runtime unavailable: {'; '.join(missing)}")


def page_packages_or_skip(check_installed) -> None:
    """Skip when a bundle page's npm packages are missing (``check_installed`` raises PreflightError),
    unless EDGESMITH_REQUIRE_BROWSER is set: there a missing package is a broken install."""
    import os

    from toolchain.core.errors import PreflightError

    try:
        check_installed()
    except PreflightError as e:
        if os.environ.get("EDGESMITH_REQUIRE_BROWSER"):
            raise
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def dates_rows() -> list[dict]:
    with open(REPO / "examples" / "data" / "dates.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, dates_rows) -> Path:
    """A tiny random Llama (tied embeddings, GQA, rope_theta 100000) with a ChatML tokenizer."""
    out = tmp_path_factory.mktemp("tiny-llama")
    texts = [m["content"] for r in dates_rows for m in r["messages"]]
    tok = build_tokenizer(out, texts)
    build_tiny_llama(out, tok)
    return out


@pytest.fixture(scope="session")
def spread_model_dir(tmp_path_factory, dates_rows) -> Path:
    """A tiny untied Llama with unit-scale weights (greedy output depends on the whole context)."""
    out = tmp_path_factory.mktemp("spread-llama")
    build_spread_llama(out, [m["content"] for r in dates_rows for m in r["messages"]])
    return out


@pytest.fixture(scope="session")
def mixed_bundle(spread_model_dir, tmp_path_factory):
    """A browser bundle of the spread model with every dtype kind: WebGPU q4f16/q4, wasm q8/fp32.
    Returns (folder, manifest). Callers skip first when the page's npm packages or the browser are missing."""
    from exporters.webgpu import export

    out = tmp_path_factory.mktemp("bundle")
    manifest = export(spread_model_dir, out, {"webgpu": ["q4f16", "q4"], "wasm": ["q8", "fp32"], "symmetric": False})
    return out, manifest
