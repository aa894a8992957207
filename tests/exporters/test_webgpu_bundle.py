"""The browser bundle exporter: layout transformers.js reads, refusals, external data, config errors.

Running the bundle in chromium is tested in tests/runtimes/test_browser_runtime.py; here only the
files (no browser needed, but web/node_modules is: the page's runtime is vendored from it).
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from tests.conftest import have
from tests.tolerances import BUNDLE_SIZE_MB

pytestmark = pytest.mark.skipif(not have("onnxruntime"), reason="needs onnxruntime")


def _vendor_or_skip():
    from exporters.webgpu.vendor import check_installed
    from tests.conftest import page_packages_or_skip

    page_packages_or_skip(check_installed)


@pytest.fixture(scope="module")
def bundle(request):
    _vendor_or_skip()
    return request.getfixturevalue("mixed_bundle")


def test_layout_is_what_transformers_js_reads(bundle, spread_model_dir):
    out, manifest = bundle
    model = out / "models" / "model"
    for name in ("index.html", "app.js", "bundle.json", "README.txt", "vendor/transformers/transformers.min.js",
                 "vendor/ort/ort-wasm-simd-threaded.jsep.wasm", "vendor/ort/ort-wasm-simd-threaded.jsep.mjs"):
        assert (out / name).is_file(), name
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "onnx/model.onnx", "onnx/model_q4.onnx", "onnx/model_q4f16.onnx", "onnx/model_quantized.onnx"):
        assert (model / name).is_file(), name
    assert not list(out.glob(".bundle-*")), "the temporary build folder was left behind"
    b = json.loads((out / "bundle.json").read_text())
    assert b["model_id"] == "model"
    assert b["dtypes"] == {"webgpu": ["q4f16", "q4"], "wasm": ["q8", "fp32"]}
    assert b["files"]["q8"] == "models/model/onnx/model_quantized.onnx"
    # native onnxruntime is compared on the file wasm loads first
    assert manifest["precision"] == "int8"
    assert manifest["runtime_options"]["model_file"] == "models/model/onnx/model_quantized.onnx"
    config = json.loads((model / "config.json").read_text())
    assert config["transformers.js_config"]["kv_cache_dtype"] == {"q4f16": "float16"}
    tok_cfg = json.loads((model / "tokenizer_config.json").read_text())
    assert "im_start" in tok_cfg["chat_template"], "the chat template must be inside tokenizer_config.json"
    assert "<script" in (out / "index.html").read_text()


def test_eos_list_includes_the_end_of_turn_token(bundle):
    from transformers import AutoTokenizer

    out, manifest = bundle
    tok = AutoTokenizer.from_pretrained(out / "models" / "model")
    gen = json.loads((out / "models" / "model" / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert tok.convert_tokens_to_ids("<|im_end|>") in eos


def test_graphs_use_only_what_onnxruntime_web_runs(bundle):
    from exporters.webgpu.browser_ops import browser_problems

    out, manifest = bundle
    for dtype, name in (("q4", "model_q4.onnx"), ("q4f16", "model_q4f16.onnx"), ("fp32", "model.onnx"),
                        ("q8", "model_quantized.onnx")):
        graph = onnx.load(str(out / "models/model/onnx" / name), load_external_data=False)
        assert browser_problems(graph) == [], dtype
        bits = {a.i for n in graph.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
        assert bits <= {4}, f"{dtype}: MatMulNBits bits {bits} (onnxruntime-web 1.22 runs bits=4 only)"
        levels = {a.i for n in graph.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
                  if a.name == "accuracy_level"}
        assert levels <= {0}, "accuracy_level 4 computes differently natively than in the browser"
    q4 = onnx.load(str(out / "models/model/onnx/model_q4.onnx"), load_external_data=False)
    assert any(n.op_type == "MatMulNBits" and n.name.endswith("lm_head") for n in q4.graph.node)
    q8 = onnx.load(str(out / "models/model/onnx/model_quantized.onnx"), load_external_data=False)
    ops = {n.op_type for n in q8.graph.node}
    assert "MatMulInteger" in ops and "MatMulNBits" not in ops


def test_native_onnxruntime_runs_the_bundles_file(bundle, spread_model_dir):
    from runtimes.onnxruntime_runtime import OnnxRuntime

    out, manifest = bundle
    rt = OnnxRuntime(out, threads=1, model_file=manifest["runtime_options"]["model_file"])
    ids = [5, 17, 42, 99, 3]
    assert len(rt.generate(ids, 8)) == 8
    size = sum(p.stat().st_size for p in (out / "models/model/onnx").glob("model_quantized.onnx*"))
    assert abs(rt_size_mb(rt) - size / 2**20) < BUNDLE_SIZE_MB.atol, "native size counts the graph and its data only"


def rt_size_mb(rt):
    from runtimes.base import dir_size_mb

    return dir_size_mb(rt.artifact_files())


def test_external_data_is_renamed_and_chunked(spread_model_dir, tmp_path, monkeypatch):
    """transformers.js fetches model_q4.onnx_data, _data_1, ... and mounts each under that name."""
    from exporters.webgpu import export, layout
    from runtimes.onnxruntime_runtime import OnnxRuntime

    _vendor_or_skip()
    monkeypatch.setattr(layout, "CHUNK_BYTES", 64 * 1024)  # force several chunks on a tiny model
    fp32 = {"webgpu": ["fp32"], "wasm": ["fp32"], "graph": "standard"}
    export(spread_model_dir, tmp_path / "inline", {**fp32, "external_data": False})
    export(spread_model_dir, tmp_path / "ext", {**fp32, "external_data": True})
    onnx_dir = tmp_path / "ext/models/model/onnx"
    chunks = sorted(p.name for p in onnx_dir.glob("model.onnx_data*"))
    assert chunks[0] == "model.onnx_data" and "model.onnx_data_1" in chunks
    config = json.loads((tmp_path / "ext/models/model/config.json").read_text())
    assert config["transformers.js_config"]["use_external_data_format"] == {"model.onnx": len(chunks)}
    graph = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False)
    locations = {e.value for t in graph.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == set(chunks)
    assert not list((tmp_path / "inline/models/model/onnx").glob("*_data*"))
    ids = [5, 17, 42, 99, 3, 8]
    a = OnnxRuntime(tmp_path / "inline", threads=1, model_file="models/model/onnx/model.onnx").logits(ids)
    b = OnnxRuntime(tmp_path / "ext", threads=1, model_file="models/model/onnx/model.onnx").logits(ids)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("options, message", [
    ({"webgpu": ["fp16", "q4f16"]}, "shader-f16"),
    ({"wasm": ["fp16"]}, "float16 compute has no onnxruntime-web wasm kernels"),
    ({"wasm": ["int2"]}, "transformers.js dtype"),
    ({"webgpu": []}, "non-empty list"),
    ({"wasm": ["q8", "q8"]}, "twice"),
    ({"webgpu": ["fp32"], "wasm": ["q8"], "graph": "standard"}, "graph: fused"),
    ({"lm_head": "int8"}, "8-bit MatMulNBits head is refused"),
    ({"external_data": "yes"}, "external_data"),
    ({"model_id": "../up"}, "model_id"),
    ({"colour": "red"}, "unknown webgpu export option"),
])
def test_bad_options_are_refused_with_the_fix(options, message):
    from exporters.webgpu import _config
    from toolchain.core.errors import PreflightError

    with pytest.raises(PreflightError, match=message):
        _config(options)


def test_refusal_table_catches_what_onnxruntime_web_aborts_on(spread_model_dir, tmp_path):
    """An int8 head and a block-quantised embedding (fine natively) are refused for the browser."""
    from exporters.onnx import export as onnx_export
    from exporters.webgpu.browser_ops import browser_problems

    onnx_export(spread_model_dir, tmp_path, {"precision": "int4", "lm_head": "int8", "quantize_embedding": True,
                                             "genai": False})
    problems = browser_problems(onnx.load(str(tmp_path / "model.onnx"), load_external_data=False))
    assert any("MatMulNBits" in p and "bits=4 only" in p for p in problems), problems
    assert any("GatherBlockQuantized" in p for p in problems), problems


def test_missing_node_modules_names_the_fix(spread_model_dir, tmp_path, monkeypatch):
    from exporters.webgpu import preflight
    from toolchain.core.errors import PreflightError

    web = tmp_path / "web"
    (web / "page").mkdir(parents=True)
    (web / "page" / "app.js").write_text("")
    (web / "package.json").write_text(json.dumps({"dependencies": {"@huggingface/transformers": "3.8.1",
                                                                    "onnxruntime-web": "1.22.0"}}))
    monkeypatch.setenv("EDGESMITH_WEB", str(web))
    monkeypatch.setenv("EDGESMITH_CACHE", str(tmp_path / "cache"))  # no packages installed there either
    with pytest.raises(PreflightError, match="fix: edgesmith setup web"):
        preflight(spread_model_dir, {})
