"""A bundle from the exporter, run headless in Debian chromium (wasm and WebGPU) through the
browser runtime, against native onnxruntime on the very same ONNX file and the HF tokenizer.

Needs node, chromium and web/node_modules: skipped without them, except in CI
(EDGESMITH_REQUIRE_BROWSER=1), where their absence fails.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import browser_tools_or_skip, have
from tests.tolerances import BROWSER_VS_NATIVE_LOGITS

pytestmark = pytest.mark.skipif(not have("onnxruntime"), reason="needs onnxruntime")

GREEDY_TOKENS = 24


@pytest.fixture(scope="module")
def bundle(request):
    browser_tools_or_skip()
    return request.getfixturevalue("mixed_bundle")


@pytest.fixture(scope="module")
def hf_tokenizer(spread_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spread_model_dir)


@pytest.fixture(scope="module")
def prompts(hf_tokenizer):
    chat = hf_tokenizer.apply_chat_template([{"role": "user", "content": "ISO date for: 1966/11/21"}],
                                            add_generation_prompt=True, tokenize=True, return_dict=False)
    return [list(chat), hf_tokenizer.encode("Write Feb 8 2008 as YYYY-MM-DD.", add_special_tokens=False)]


def native(out, dtype_file):
    from runtimes.onnxruntime_runtime import OnnxRuntime

    return OnnxRuntime(out, threads=1, model_file=dtype_file)


@pytest.fixture(scope="module")
def wasm(bundle):
    from runtimes.browser_runtime import BrowserWasmRuntime

    rt = BrowserWasmRuntime(bundle[0], threads=2)
    rt.load()
    yield rt
    rt.close()


def test_wasm_picks_the_bundles_wasm_dtype_cross_origin_isolated(wasm):
    assert wasm.loaded["device"] == "wasm" and wasm.loaded["dtype"] == "q8"
    assert wasm.precision == "int8"
    assert wasm.loaded["crossOriginIsolated"], "without COOP/COEP onnxruntime-web runs one wasm thread"


def test_tokenizer_and_chat_template_match_transformers(wasm):
    check = wasm.tokenizer_check()
    assert check["strings"] >= 8 and check["conversations"] >= 2
    assert check["mismatches"] == [], check["mismatches"][:2]


def test_wasm_greedy_equals_native_on_the_same_file(wasm, bundle, prompts):
    out, manifest = bundle
    ref = native(out, manifest["runtime_options"]["model_file"])
    for ids in prompts:
        assert wasm.generate(ids, GREEDY_TOKENS) == ref.generate(ids, GREEDY_TOKENS)


def test_wasm_generate_stops_at_a_stop_id_like_every_runtime(wasm, bundle, prompts):
    out, manifest = bundle
    ref = native(out, manifest["runtime_options"]["model_file"]).generate(prompts[0], GREEDY_TOKENS)
    stop = ref[5]
    want = ref[: ref.index(stop) + 1]
    assert wasm.generate(prompts[0], GREEDY_TOKENS, stop_ids=[stop]) == want


def test_wasm_logits_of_every_position_match_native(wasm, bundle, prompts):
    out, manifest = bundle
    ids = prompts[0]
    got = wasm.logits(ids)
    want = native(out, manifest["runtime_options"]["model_file"]).logits(ids)
    assert got.shape == want.shape == (len(ids), want.shape[1])
    assert np.abs(got - want).max() < BROWSER_VS_NATIVE_LOGITS.atol


def test_wasm_bench_fills_the_shared_schema(wasm, prompts):
    from toolchain.core.benchschema import BenchSettings

    settings = BenchSettings(threads=2, prompt_tokens=16, gen_tokens=8, repetitions=2, warmup=1)
    r = wasm.bench(prompts[0] * 2, settings, target="t", load_s=1.0).to_dict()
    assert r["runtime"] == "browser-wasm"
    assert r["decode_tps"]["n"] == 2 and r["decode_tps"]["min"] > 0
    assert r["prefill_tps"]["mean"] > 0 and r["ttft_ms"]["mean"] > 0
    assert r["machine"]["browser"]["dtype"] == "q8" and r["artifact_mb"] > 0
    assert r["machine"]["browser"]["tokenizer_check"]["mismatches"] == []


def test_wasm_fp32_by_option_matches_native(bundle, prompts):
    from runtimes.browser_runtime import BrowserWasmRuntime

    out, _ = bundle
    rt = BrowserWasmRuntime(out, threads=1, dtype="fp32")
    try:
        assert rt.generate(prompts[1], GREEDY_TOKENS) == native(out, "models/model/onnx/model.onnx").generate(
            prompts[1], GREEDY_TOKENS)
        assert rt.precision == "fp32"
    finally:
        rt.close()


def test_webgpu_falls_back_without_shader_f16_and_matches_native(bundle, prompts):
    """SwiftShader has no shader-f16: the page must skip q4f16 (a failed session would poison the
    page) and run q4, with the same greedy output and logits as native onnxruntime."""
    from runtimes.browser_runtime import BrowserWebgpuRuntime

    out, manifest = bundle
    rt = BrowserWebgpuRuntime(out)
    try:
        rt.load()
        adapter = rt.loaded["adapter_info"]
        if adapter["shader_f16"]:
            pytest.skip("this adapter has shader-f16: the fallback is not exercised here")
        assert rt.loaded["dtype"] == "q4"
        ref = native(out, "models/model/onnx/model_q4.onnx")
        for ids in prompts:
            assert rt.generate(ids, GREEDY_TOKENS) == ref.generate(ids, GREEDY_TOKENS)
        assert np.abs(rt.logits(prompts[0]) - ref.logits(prompts[0])).max() < BROWSER_VS_NATIVE_LOGITS.atol
    finally:
        rt.close()


def test_a_page_error_is_reported_and_the_runtime_refuses_a_missing_bundle(wasm, tmp_path):
    from runtimes.browser_runtime import BrowserWasmRuntime

    with pytest.raises(RuntimeError, match="unknown op"):
        wasm.call("noSuchOp")
    with pytest.raises(FileNotFoundError, match="not a browser bundle"):
        BrowserWasmRuntime(tmp_path).load()
