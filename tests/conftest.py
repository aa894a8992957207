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
