"""The WebLLM bundle's browser side: the app-config entry, the vendored page, and the bundle run in
headless chromium through @mlc-ai/web-llm's own engine (runtime ``browser-webllm``).

The in-browser parity test needs a model library: it builds a tiny Llama bundle (weights, chat
config, library compiled with apache-tvm + emscripten for q0f32 and q4f32_1) and checks web-llm's
greedy ids on the software WebGPU adapter against torch's. It is skipped when tvm, emcc, node or
chromium are missing (failed instead under EDGESMITH_REQUIRE_BROWSER).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import browser_tools_or_skip
from tests.tolerances import WEBLLM_BROWSER_Q0F32_LOGITS, WEBLLM_GREEDY_MATCH
from toolchain.core.errors import EdgesmithError, PreflightError

GREEDY_TOKENS = 16
QUANTS = ("q0f32", "q4f32_1")  # what SwiftShader can run: no shader-f16


# ---------------------------------------------------------------------------- app config entry
@pytest.mark.parametrize("quant, features", [("q0f32", []), ("q4f32_1", []), ("q0f16", ["shader-f16"]),
                                             ("q4f16_1", ["shader-f16"])])
def test_app_config_entry_features_follow_the_quantisation(quant, features):
    from exporters.webllm.vendor import app_config_entry

    e = app_config_entry(f"m-{quant}-MLC", f"models/m-{quant}-MLC", f"libs/m-{quant}.wasm", quant, 123.456,
                         overrides={"context_window_size": 1024})
    assert e == {"model": f"models/m-{quant}-MLC/", "model_id": f"m-{quant}-MLC", "model_lib": f"libs/m-{quant}.wasm",
                 "required_features": features, "vram_required_MB": 123.46, "low_resource_required": True,
                 "overrides": {"context_window_size": 1024}}


def test_app_config_refusals_name_the_fix():
    from exporters.webllm.vendor import app_config, app_config_entry

    assert "model_lib" not in app_config_entry("m", "models/m/", None, "q0f32", 1)
    with pytest.raises(EdgesmithError, match="quantisation must be one of .*q8f16"):
        app_config_entry("m", "models/m/", "libs/m.wasm", "q8f16", 1)
    with pytest.raises(EdgesmithError, match="vram_required_MB .* positive"):
        app_config_entry("m", "models/m/", "libs/m.wasm", "q0f32", 0)
    e = app_config_entry("m", "models/m/", "libs/m.wasm", "q0f32", 1)
    assert app_config([e])["cacheBackend"] == "cache"
    with pytest.raises(EdgesmithError, match="unique"):
        app_config([e, e])
    with pytest.raises(EdgesmithError, match="cacheBackend must be one of"):
        app_config([e], cache_backend="memory")


# ---------------------------------------------------------------------------- the vendored page
def test_copy_page_vendors_web_llm_at_the_locked_version(tmp_path):
    from exporters.webllm.vendor import check_installed, copy_page
    from toolchain.core.webassets import node_modules_dir

    if not (node_modules_dir() / "@mlc-ai" / "web-llm" / "lib" / "index.js").is_file():
        pytest.skip(f"{node_modules_dir()} has no @mlc-ai/web-llm (fix: edgesmith setup web)")
    out = copy_page(tmp_path)
    assert out["version"] == check_installed() == "0.2.86"
    assert {"index.html", "app.js", "vendor/web-llm/index.js"} <= set(out["files"])
    page = (tmp_path / "app.js").read_text()
    assert "from './vendor/web-llm/index.js'" in page  # the engine comes from the bundle, not a CDN
    assert (tmp_path / "vendor/web-llm/index.js").stat().st_size > 10**6  # the real single-file build
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_stale_install_is_refused_with_the_fix(tmp_path):
    from exporters.webllm.vendor import check_installed

    web = tmp_path / "web"
    (web / "page-webllm").mkdir(parents=True)
    (web / "page-webllm" / "app.js").write_text("")
    (web / "package.json").write_text(json.dumps({"dependencies": {"@mlc-ai/web-llm": "0.2.86"}}))
    (web / "package-lock.json").write_text(json.dumps(
        {"packages": {"node_modules/@mlc-ai/web-llm": {"version": "0.2.86"}}}))
    pkg = web / "node_modules" / "@mlc-ai" / "web-llm"
    pkg.mkdir(parents=True)
    (pkg / "package.json").write_text(json.dumps({"version": "0.2.80"}))
    with pytest.raises(PreflightError, match=r"has @mlc-ai/web-llm 0.2.80, .*locks 0.2.86 \(fix: edgesmith setup web\)"):
        check_installed(web)
    (web / "package-lock.json").write_text(json.dumps({"packages": {}}))
    with pytest.raises(PreflightError, match="package-lock.json locks None"):
        check_installed(web)


# ---------------------------------------------------------------------------- runtime, no browser
def _stub_bundle(root, primary="q4f32_1"):
    from exporters.webllm.vendor import app_config, app_config_entry

    entries = [app_config_entry(f"m-{q}-MLC", f"models/m-{q}-MLC/", f"libs/m-{q}.wasm", q, 10)
               for q in ("q4f16_1", "q4f32_1")]
    root.mkdir(parents=True, exist_ok=True)
    (root / "app-config.json").write_text(json.dumps(app_config(entries)))
    (root / "bundle.json").write_text(json.dumps({"primary": primary}))
    return root


def test_model_id_from_options_quant_or_the_bundles_primary(tmp_path):
    from runtimes.webllm_runtime import BrowserWebllmRuntime

    root = _stub_bundle(tmp_path / "b")
    assert BrowserWebllmRuntime(root).model_id() == "m-q4f32_1-MLC"
    assert BrowserWebllmRuntime(root, quant="q4f16_1").model_id() == "m-q4f16_1-MLC"
    assert BrowserWebllmRuntime(root, model_id="m-q4f16_1-MLC").model_id() == "m-q4f16_1-MLC"
    with pytest.raises(ValueError, match="model_id 'x' is not in app-config.json"):
        BrowserWebllmRuntime(root, model_id="x").model_id()
    with pytest.raises(FileNotFoundError, match="not a WebLLM bundle"):
        BrowserWebllmRuntime(tmp_path).load()


# ---------------------------------------------------------------------------- in chromium
def _library_tools_or_skip():
    import os

    browser_tools_or_skip()
    try:
        from exporters.webllm.library import toolchain
        from exporters.webllm.library.compile import compile_library  # noqa: F401
    except ImportError as e:
        pytest.skip(f"the WebLLM model library compiler is not available: {e}")
    missing = toolchain.missing_tools()
    if missing and os.environ.get("EDGESMITH_REQUIRE_BROWSER"):
        pytest.fail(f"EDGESMITH_REQUIRE_BROWSER is set but the library toolchain lacks: {'; '.join(missing)}")
    if missing:
        pytest.skip(f"library toolchain unavailable: {'; '.join(missing)}")


def test_f16_quant_on_the_software_adapter_is_refused_naming_the_fix(tmp_path):
    browser_tools_or_skip()
    from exporters.webllm.vendor import copy_page
    from runtimes.webllm_runtime import BrowserWebllmRuntime

    root = _stub_bundle(tmp_path / "b")
    copy_page(root)
    rt = BrowserWebllmRuntime(root, quant="q4f16_1", timeout_s=120)
    with pytest.raises(RuntimeError) as e:
        rt.load()
    if "shader-f16" not in str(e.value):
        pytest.skip(f"this machine's WebGPU adapter has shader-f16: {e.value}")
    assert "fix: load an f32 quantisation such as m-q4f32_1-MLC" in str(e.value)


@pytest.fixture(scope="module")
def webllm_bundle(tmp_path_factory, spread_model_dir):
    """A tiny untied Llama WebLLM bundle built from the pieces, for q0f32 and q4f32_1 (the spread
    model: its greedy output depends on the context, unlike the small-weight tiny model's)."""
    _library_tools_or_skip()
    from exporters.webllm.chat_config import write_chat_config
    from exporters.webllm.families import family_for
    from exporters.webllm.library.compile import compile_library
    from exporters.webllm.vendor import app_config, app_config_entry, copy_page
    from exporters.webllm.weights import convert

    root = tmp_path_factory.mktemp("webllm-bundle")
    hf = json.loads((spread_model_dir / "config.json").read_text())
    family = family_for(hf)
    mc = dict(family.model_config(hf), context_window_size=512, prefill_chunk_size=128)
    entries, libs = [], {}
    for quant in QUANTS:
        mid = f"tiny-{quant}-MLC"
        folder = root / "models" / mid
        convert(spread_model_dir, folder, quant, model_config=mc)
        write_chat_config(spread_model_dir, folder, model_type=family.name, quant=quant, model_config=mc,
                          context_window_size=512, prefill_chunk_size=128)
        libs[quant] = compile_library(family.name, mc, quant, root / "libs" / f"{mid}.wasm")
        entries.append(app_config_entry(mid, f"models/{mid}/", f"libs/{mid}.wasm", quant, 64))
    (root / "app-config.json").write_text(json.dumps(app_config(entries)))
    copy_page(root)
    (root / "bundle.json").write_text(json.dumps({"model_id": "tiny", "primary": QUANTS[0]}))
    return root, libs


@pytest.fixture(scope="module")
def prompts(spread_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spread_model_dir)
    chat = tok.apply_chat_template([{"role": "user", "content": "ISO date for: 1966/11/21"}],
                                   add_generation_prompt=True, tokenize=True, return_dict=False)
    return [list(chat), tok.encode("Write Feb 8 2008 as YYYY-MM-DD.", add_special_tokens=False)]


def _torch_greedy(model_dir, ids, n, quant):
    """torch's greedy ids; for q4f32_1 on the model whose linear weights went through the group-int4
    round trip of the MLC files (so both sides run the same numbers)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if quant != "q0f32":
        from exporters.webllm.quant import dequantize_group, quant_spec, quantize_group

        spec = quant_spec(quant)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 2:  # linear weights and the (tied) embedding: int4 groups along the input dim
                    q, s = quantize_group(p.detach().numpy().astype(np.float32), spec)
                    p.copy_(torch.from_numpy(np.asarray(dequantize_group(q, s, spec, p.shape[1]), dtype=np.float32)))
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0, min_new_tokens=n)
    return out[0, len(ids):].tolist()


def _torch_logits(model_dir, ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("quant", QUANTS)
def test_web_llm_greedy_matches_torch_in_chromium(webllm_bundle, spread_model_dir, prompts, quant):
    from runtimes.webllm_runtime import BrowserWebllmRuntime

    root, _ = webllm_bundle
    rt = BrowserWebllmRuntime(root, quant=quant, timeout_s=600)
    rt.load()
    try:
        assert rt.loaded["model_id"] == f"tiny-{quant}-MLC" and rt.loaded["required_features"] == []
        want = [_torch_greedy(spread_model_dir, ids, GREEDY_TOKENS, quant) for ids in prompts]
        assert any(len(set(w)) > 2 for w in want), f"torch's greedy output is degenerate, a weak check: {want}"
        got = [rt.generate(ids, GREEDY_TOKENS) for ids in prompts]
        matches = [g == w for g, w in zip(got, want)]
        assert sum(matches) / len(matches) >= WEBLLM_GREEDY_MATCH.lo, (got, want)
        if quant == "q0f32":  # web-llm's decode-path logits (LogitProcessor) against torch's, same weights
            ids = prompts[1][:12]
            diff = np.abs(rt.logits(ids) - _torch_logits(spread_model_dir, ids)).max()
            assert diff <= WEBLLM_BROWSER_Q0F32_LOGITS.atol, diff
        check = rt.tokenizer_check()
        assert check["mismatches"] == [], check["mismatches"][:2]
        # the OpenAI-style chat path (web-llm's conv_template prompt) answers what greedy does on the HF prompt
        reply = rt.chat([{"role": "user", "content": "ISO date for: 1966/11/21"}], max_tokens=8)
        assert reply["ids"] and reply["ids"] == rt.generate(prompts[0], len(reply["ids"]))
    finally:
        rt.close()


def test_bench_fills_the_shared_schema(webllm_bundle):
    from runtimes.webllm_runtime import BrowserWebllmRuntime
    from toolchain.core.benchschema import BenchSettings

    root, _ = webllm_bundle
    rt = BrowserWebllmRuntime(root, timeout_s=600)
    try:
        r = rt.bench(list(range(3, 35)), BenchSettings(prompt_tokens=32, gen_tokens=8, repetitions=2, warmup=1))
    finally:
        rt.close()
    assert r.runtime == "browser-webllm" and r.prefill_tps.median > 0 and r.decode_tps.median > 0
    assert r.ttft_ms.median > 0 and r.artifact_mb > 0
    assert any("software adapter" in w for w in r.warnings) == any(
        s in json.dumps(rt.loaded.get("adapter_info")).lower() for s in ("swiftshader", "llvmpipe", "lavapipe"))


def test_library_is_cached_by_hash_and_carries_mlc_metadata(webllm_bundle, spread_model_dir, tmp_path):
    """A second build of the same (architecture, config, quantisation) reuses the linked library:
    no compile, no relink, the same bytes; its _metadata lists mlc-llm's parameter names."""
    from exporters.webllm.families import family_for
    from exporters.webllm.library.compile import compile_library

    root, libs = webllm_bundle
    hf = json.loads((spread_model_dir / "config.json").read_text())
    family = family_for(hf)
    mc = dict(family.model_config(hf), context_window_size=512, prefill_chunk_size=128)
    again = compile_library(family.name, mc, "q0f32", tmp_path / "again.wasm")
    assert again["cached"] and again["link_s"] == 0
    assert (tmp_path / "again.wasm").read_bytes() == (root / "libs" / "tiny-q0f32-MLC.wasm").read_bytes()
    names = [p["name"] for p in again["metadata"]["params"]]
    assert "model.layers.0.self_attn.qkv_proj.weight" in names and "lm_head.weight" in names  # untied
    assert (tmp_path / "again.wasm").read_bytes()[:4] == b"\0asm"

