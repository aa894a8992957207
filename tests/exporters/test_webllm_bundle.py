"""The WebLLM bundle exporter: options, preflight refusals, the bundle's files and its manifest.

The pieces have their own tests (weights and NumPy reference: test_webllm_weights.py; chat config:
test_webllm_chat_config.py; model library: test_webllm_library.py / test_webllm_toolchain.py;
the bundle in chromium: tests/runtimes/test_webllm_runtime.py). Here the exporter that joins them,
on a tiny model with weights and config only (``libraries: []``: no compile).
"""
from __future__ import annotations

import json

import pytest

from exporters.webllm.config import WebllmExportConfig
from tests.tolerances import WEBLLM_BUNDLE_Q0F32_KL
from toolchain.core.errors import PreflightError


@pytest.mark.parametrize("options, words", [
    ({"quants": ["q8f16"]}, "'q8f16' is not an MLC quantisation"),
    ({"quants": []}, "non-empty list"),
    ({"quants": ["q0f32", "q0f32"]}, "twice"),
    ({"quants": ["q0f32"], "libraries": ["q4f32_1"]}, "which `quants`"),
    ({"context_window_size": 0}, "positive integer"),
    ({"compiler": "gcc"}, "`compiler` must be one of"),
    ({"model_id": "../up"}, "plain name"),
    ({"conv_template": "chatml"}, "conv_template"),
    ({"reference_check": "yes"}, "true or false"),
    ({"quantz": ["q0f32"]}, "unknown webllm export option(s) 'quantz'"),
])
def test_bad_options_name_the_key_and_fix(options, words):
    with pytest.raises((ValueError, TypeError)) as e:
        WebllmExportConfig.coerce(options)
    assert words in str(e.value)


def test_defaults_and_primary():
    cfg = WebllmExportConfig.coerce(None)
    assert cfg.quants == ("q4f16_1", "q4f32_1") and cfg.libraries == cfg.quants
    # a software WebGPU adapter has no shader-f16: the browser runs the first f32 quantisation with a library
    assert cfg.primary == "q4f32_1"
    assert WebllmExportConfig.coerce({"quants": ["q0f16", "q0f32"], "libraries": ["q0f16"]}).primary == "q0f16"
    assert WebllmExportConfig.coerce({"quants": ["q0f32"], "libraries": []}).libraries == ()
    assert cfg.mlc_model_id("q4f32_1") == "model-q4f32_1-MLC"


def test_preflight_refuses_unsupported_architecture(tmp_path, tiny_model_dir):
    import shutil

    from exporters.webllm import preflight

    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(model_type="mamba", architectures=["MambaForCausalLM"])
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PreflightError) as e:
        preflight(model, {"libraries": []})
    assert "mamba" in str(e.value).lower() or "Mamba" in str(e.value)
    (model / "tokenizer.json").unlink()
    with pytest.raises(PreflightError, match="tokenizer.json"):
        preflight(model, {"libraries": []})


@pytest.fixture(scope="module")
def weights_bundle(tmp_path_factory, request):
    from exporters.webllm import export
    from exporters.webllm.vendor import check_installed
    from tests.conftest import page_packages_or_skip

    page_packages_or_skip(check_installed)
    model = request.getfixturevalue("spread_model_dir")
    out = tmp_path_factory.mktemp("webllm-bundle")
    manifest = export(model, out, {"quants": ["q4f16_1", "q4f32_1", "q0f16", "q0f32"], "libraries": [],
                                   "reference_tokens": 48})
    return out, manifest


def test_bundle_files_and_app_config(weights_bundle):
    out, manifest = weights_bundle
    for name in ("index.html", "app.js", "app-config.json", "bundle.json", "README.txt"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".bundle-*")), "the temporary build folder was left behind"
    app = json.loads((out / "app-config.json").read_text())
    ids = [m["model_id"] for m in app["model_list"]]
    assert ids == [f"model-{q}-MLC" for q in ("q4f16_1", "q4f32_1", "q0f16", "q0f32")]
    for entry in app["model_list"]:
        folder = out / entry["model"].rstrip("/")
        for name in ("mlc-chat-config.json", "tensor-cache.json", "tokenizer.json"):
            assert (folder / name).is_file(), f"{folder.name}/{name}"
        assert list(folder.glob("params_shard_*.bin")), folder
        chat = json.loads((folder / "mlc-chat-config.json").read_text())
        assert chat["quantization"] == entry["model_id"].split("-")[1]
        assert ("shader-f16" in entry.get("required_features", [])) == chat["quantization"].endswith(("f16", "f16_1"))
        assert entry["vram_required_MB"] > 0
    assert manifest["format"] == "webllm" and manifest["libraries"] == {}
    # no library built: the README says which weights need WebLLM's prebuilt library
    assert "q4f16_1, q4f32_1, q0f16, q0f32" in (out / "README.txt").read_text()


def test_every_quant_passes_the_numpy_reference_check(weights_bundle):
    _, manifest = weights_bundle
    checks = manifest["reference_check"]
    assert set(checks) == {"q4f16_1", "q4f32_1", "q0f16", "q0f32"}
    for quant, chk in checks.items():
        assert chk["gate"]["passed"], (quant, chk["gate"]["failures"])
    # the float32 copy is the merged model itself: only summation order differs
    assert checks["q0f32"]["quality"]["kl_mean"] < WEBLLM_BUNDLE_Q0F32_KL.kl
    assert checks["q0f32"]["quality"]["top1_agreement"] == 1.0
    # and 4-bit is measurably lossy: the check is not comparing a file with itself
    assert checks["q4f32_1"]["quality"]["kl_mean"] > checks["q0f16"]["quality"]["kl_mean"]
    assert not manifest["warnings"]
