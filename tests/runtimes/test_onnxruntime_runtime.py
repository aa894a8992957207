"""onnxruntime runtime: the shared-KV-buffer path (GroupQueryAttention graphs) against the plain
path that copies the cache through present outputs, on the same exported file."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

import runtimes.onnxruntime_runtime as ortrt  # noqa: E402
from exporters.onnx import export  # noqa: E402
from tests.tolerances import SAME_GRAPH_SAME_KERNELS  # noqa: E402


@pytest.fixture(scope="module")
def fused_export(tmp_path_factory):
    config = transformers.AutoConfig.for_model(
        "llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=256, max_position_embeddings=512, initializer_range=0.1)
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("ort-runtime")
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / "hf")
    export(root / "hf", root / "onnx", {"genai": False})
    return root / "onnx"


def test_shared_buffer_matches_plain_path_through_capacity_growth(fused_export, monkeypatch):
    monkeypatch.setattr(ortrt, "INITIAL_CAPACITY", 8)
    shared = ortrt.OnnxRuntime(fused_export, threads=1)
    plain = ortrt.OnnxRuntime(fused_export, threads=1, no_shared_kv=True)
    shared.load()
    plain.load()
    assert shared.shared_kv and not plain.shared_kv
    ids = np.random.default_rng(0).integers(3, 256, size=80).tolist()  # 5 + 75 decodes: grows 8 -> ... -> 128
    a, sa = shared.prefill(ids[:5], all_logits=True)
    b, sb = plain.prefill(ids[:5], all_logits=True)
    np.testing.assert_allclose(a, b, atol=SAME_GRAPH_SAME_KERNELS.atol, rtol=0)
    for tok in ids[5:]:
        a, sa = shared.decode(sa, tok)
        b, sb = plain.decode(sb, tok)
        np.testing.assert_allclose(a, b, atol=SAME_GRAPH_SAME_KERNELS.atol, rtol=0)
    assert sa.length == sb.length == 80 and sa.presents[0].shape[2] >= 80


def test_shared_state_is_single_use(fused_export):
    rt = ortrt.OnnxRuntime(fused_export, threads=1)
    _, state = rt.prefill([5, 6, 7])
    rt.decode(state, 8)
    with pytest.raises(ValueError, match="already advanced"):
        rt.decode(state, 9)
