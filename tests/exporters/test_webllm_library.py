"""The WebLLM model library (exporters/webllm/library): the Relax model, its sampler and the pipeline.

Tiny Llama (tied embeddings) and Qwen2 (untied, qkv bias) models are built at test time,
converted to MLC weights by the exporter's own converter, compiled for the CPU (llvm) and run
through the paged KV cache the way @mlc-ai/web-llm drives the library: ``embed``, one ``prefill``
of the prompt, then one ``decode`` per token, each between ``kv_state_begin_forward`` and
``kv_state_end_forward``. The WebGPU build and link are tested in tests/runtimes/test_webllm_runtime.py.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

tvm = pytest.importorskip("tvm", reason="apache-tvm is needed to compile the WebLLM model library")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tvm import relax  # noqa: E402
from tvm.runtime import ShapeTuple  # noqa: E402

from exporters.webllm import weights as mlc_weights  # noqa: E402
from exporters.webllm.families import family_for  # noqa: E402
from exporters.webllm.library import compile as lib  # noqa: E402
from exporters.webllm.library.model import build_model  # noqa: E402
from exporters.webllm.library.sampler import SAMPLER_FUNCTIONS  # noqa: E402
from exporters.webllm.quant import QUANTS  # noqa: E402
from exporters.webllm.reference import reference_logits  # noqa: E402
from exporters.webllm.tensor_cache import load_tensor_cache  # noqa: E402
from tests.tolerances import (  # noqa: E402
    WEBLLM_LIB_F16_VS_REFERENCE,
    WEBLLM_LIB_Q0F32,
    WEBLLM_LIB_Q4_VS_REFERENCE,
    WEBLLM_LIB_Q4_VS_TORCH_COSINE,
    WEBLLM_PENALTY,
    WEBLLM_SOFTMAX,
)

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=256, max_position_embeddings=128,
            rope_theta=100000.0,  # not the 10000 default: catches a lost rope base
            initializer_range=0.1)  # larger than default so argmax has clear margins
FAMILIES = {
    "llama": dict(tie_word_embeddings=True),
    "qwen2": dict(tie_word_embeddings=False),  # untied: lm_head; Qwen2's c_attn has a bias
}
PROMPT_LEN, SEQ_LEN = 7, 12
KV = dict(max_batch=1, page_size=16, sliding_window=0)  # what web-llm passes


def _hf_model(model_type: str, out):
    config = transformers.AutoConfig.for_model(model_type, **{**TINY, **FAMILIES[model_type]})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms start as ones and biases as zeros: random ones catch a lost one
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.3)
    model.save_pretrained(out)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """model_type -> (torch model, HF dir, mlc model_config)."""
    out = {}
    for model_type in FAMILIES:
        d = tmp_path_factory.mktemp(f"hf-{model_type}")
        model = _hf_model(model_type, d)
        hf_config = json.loads((d / "config.json").read_text())
        out[model_type] = (model, d, family_for(hf_config).model_config(hf_config))
    return out


class Session:
    """One sequence through a CPU-built library, driven as web-llm drives it."""

    def __init__(self, executable, metadata: dict, weights_dir):
        self.dev = tvm.cpu()
        self.vm = relax.VirtualMachine(executable, self.dev)
        names = [p["name"] for p in metadata["params"]]
        arrays, _ = load_tensor_cache(weights_dir, names)
        self.params = [tvm.runtime.tensor(arrays[n], self.dev) for n in names]
        self.kv = self.vm["create_tir_paged_kv_cache"](
            ShapeTuple([KV["max_batch"]]), ShapeTuple([metadata["context_window_size"]]),
            ShapeTuple([metadata["prefill_chunk_size"]]), ShapeTuple([KV["page_size"]]),
            ShapeTuple([KV["sliding_window"]]))
        self._begin = tvm.get_global_func("vm.builtin.kv_state_begin_forward")
        self._end = tvm.get_global_func("vm.builtin.kv_state_end_forward")
        tvm.get_global_func("vm.builtin.kv_state_add_sequence")(self.kv, 0)

    def tensor(self, a):
        return tvm.runtime.tensor(np.ascontiguousarray(a), self.dev)

    def step(self, ids, fn: str, *extra) -> np.ndarray:
        embeds = self.vm["embed"](self.tensor(np.asarray(ids, "int32")), self.params).numpy()[None]
        self._begin(self.kv, ShapeTuple([0]), ShapeTuple([len(ids)]))
        out = self.vm[fn](self.tensor(embeds), *[self.tensor(e) for e in extra], self.kv, self.params)
        self._end(self.kv)
        return out[0].numpy()

    def greedy(self, logits: np.ndarray, uniform: float = 0.73) -> int:
        """web-llm's temperature-0 path: softmax at 1e-6, argsort, top-p sample (top_p 1)."""
        probs = self.vm["softmax_with_temperature"](
            self.tensor(logits.reshape(1, 1, -1).astype("float32")),
            self.tensor(np.array([1e-6], "float32")))
        return self.sample(probs.numpy().reshape(1, -1), uniform, top_p=1.0)

    def sample(self, probs: np.ndarray, uniform: float, top_p: float) -> int:
        ordered = self.vm["argsort_probs"](self.tensor(probs.astype("float32")))
        token = self.vm["sample_with_top_p"](
            ordered[0], ordered[1], self.tensor(np.array([uniform], "float32")),
            self.tensor(np.array([0], "int32")), self.tensor(np.array([top_p], "float32")))
        return int(token.numpy()[0])


def run_library(model_type, model_config, quant, weights_dir, ids):
    ex, metadata = lib.compile_cpu(model_type, model_config, quant)
    s = Session(ex, metadata, weights_dir)
    rows = [s.step(ids[:PROMPT_LEN], "prefill")[0, -1]]
    rows += [s.step(ids[i:i + 1], "decode")[0, -1] for i in range(PROMPT_LEN, len(ids))]
    return np.stack(rows), s, metadata


def prompt_ids() -> np.ndarray:
    return np.random.default_rng(1).integers(3, TINY["vocab_size"] - 3, size=SEQ_LEN).astype("int32")


def torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids[None].astype("int64"))).logits[0].float().numpy()


# -- parameter table ---------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", list(FAMILIES))
@pytest.mark.parametrize("quant", list(QUANTS))
def test_parameters_are_the_weight_files_in_mlc_order(tiny, model_type, quant):
    """Names, shapes, dtypes and order of the library's parameters are those the converter writes
    (mlc-llm's module order), so either library loads either weights."""
    _, _, cfg = tiny[model_type]
    model, _ = build_model(model_type, cfg, QUANTS[quant], tvm.target.Target({"kind": "llvm"}))
    got = [(n, tuple(int(s) for s in p.shape), str(p.dtype)) for n, p in model.named_parameters()]
    family = family_for({"model_type": model_type, "architectures": []})
    want = mlc_weights.mlc_param_specs(family.params(cfg), QUANTS[quant])
    assert got == [(n, tuple(s), d) for n, s, d in want]
    names = [n for n, _, _ in got]
    assert ("lm_head.weight" in names or "lm_head.q_weight" in names) == (not cfg["tie_word_embeddings"])


# -- numerics on the CPU -----------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_q0f32_prefill_and_decode_match_torch_and_greedy_is_argmax(tiny, tmp_path, model_type):
    model, hf_dir, cfg = tiny[model_type]
    mlc_weights.convert(hf_dir, tmp_path, "q0f32")
    ids = prompt_ids()
    got, session, metadata = run_library(model_type, cfg, "q0f32", tmp_path, ids)
    want = torch_logits(model, ids)[PROMPT_LEN - 1:]
    assert np.abs(got - want).max() < WEBLLM_LIB_Q0F32.atol
    for row in got:
        assert session.greedy(row) == int(row.argmax())
    # the library describes itself as web-llm reads it
    meta = json.loads(str(session.vm["_metadata"]()))
    assert meta["kv_state_kind"] == "kv_cache" and meta["model_type"] == model_type
    assert meta["prefill_chunk_size"] == cfg["prefill_chunk_size"] > 0
    assert [p["name"] for p in meta["params"]] == [p["name"] for p in metadata["params"]]
    assert set(meta["memory_usage"]) >= {"prefill", "decode", "embed"}


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_q4f32_1_matches_the_numpy_reference_and_stays_near_torch(tiny, tmp_path, model_type):
    model, hf_dir, cfg = tiny[model_type]
    mlc_weights.convert(hf_dir, tmp_path, "q4f32_1")
    ids = prompt_ids()
    got, session, _ = run_library(model_type, cfg, "q4f32_1", tmp_path, ids)
    ref = reference_logits(tmp_path, cfg, model_type, "q4f32_1", ids.tolist())[PROMPT_LEN - 1:]
    assert np.abs(got - ref).max() < WEBLLM_LIB_Q4_VS_REFERENCE.atol
    want = torch_logits(model, ids)[PROMPT_LEN - 1:]
    cosine = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
    assert cosine.min() > WEBLLM_LIB_Q4_VS_TORCH_COSINE.lo
    for row in got:
        assert session.greedy(row) == int(row.argmax())


@pytest.mark.parametrize("model_type, quant", [("llama", "q0f16"), ("qwen2", "q4f16_1")])
def test_float16_quantisations_match_the_numpy_reference(tiny, tmp_path, model_type, quant):
    _, hf_dir, cfg = tiny[model_type]
    mlc_weights.convert(hf_dir, tmp_path, quant)
    ids = prompt_ids()
    got, session, _ = run_library(model_type, cfg, quant, tmp_path, ids)
    ref = reference_logits(tmp_path, cfg, model_type, quant, ids.tolist())[PROMPT_LEN - 1:]
    assert np.abs(got - ref).max() < WEBLLM_LIB_F16_VS_REFERENCE.atol
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_batch_prefill_and_batch_decode_match_prefill_and_decode(tiny, tmp_path):
    model_type = "llama"
    _, hf_dir, cfg = tiny[model_type]
    mlc_weights.convert(hf_dir, tmp_path, "q0f32")
    ids = prompt_ids()
    single, _, _ = run_library(model_type, cfg, "q0f32", tmp_path, ids)
    ex, metadata = lib.compile_cpu(model_type, cfg, "q0f32")
    s = Session(ex, metadata, tmp_path)
    rows = [s.step(ids[:PROMPT_LEN], "batch_prefill", np.array([PROMPT_LEN - 1], "int32"))[0, -1]]
    rows += [s.step(ids[i:i + 1], "batch_decode")[0, -1] for i in range(PROMPT_LEN, len(ids))]
    assert np.abs(np.stack(rows) - single).max() < WEBLLM_LIB_Q0F32.atol


# -- sampler and logit processors ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def sampler_session(tiny, tmp_path_factory):
    _, hf_dir, cfg = tiny["llama"]
    d = tmp_path_factory.mktemp("mlc-sampler")
    mlc_weights.convert(hf_dir, d, "q0f32")
    ex, metadata = lib.compile_cpu("llama", cfg, "q0f32")
    return Session(ex, metadata, d)


def _nucleus_reference(probs: np.ndarray, u: float, top_p: float) -> int:
    order = np.argsort(-probs, kind="stable")
    cum = np.cumsum(probs[order])
    last = int(np.searchsorted(cum, top_p))  # first position reaching top_p
    last = min(last, len(cum) - 1)
    mass = cum[last]
    pos = int(np.sum(cum <= u * mass))
    return int(order[min(pos, last)])


def test_softmax_with_temperature_and_top_p_sampling_match_numpy(sampler_session):
    s = sampler_session
    logits = np.random.default_rng(3).normal(size=TINY["vocab_size"]).astype("float32") * 2
    temperature = 0.7
    probs = s.vm["softmax_with_temperature"](
        s.tensor(logits.reshape(1, 1, -1)), s.tensor(np.array([temperature], "float32"))).numpy()
    want = np.exp(logits / temperature - (logits / temperature).max())
    want /= want.sum()
    np.testing.assert_allclose(probs.reshape(-1), want, rtol=WEBLLM_SOFTMAX.rtol, atol=WEBLLM_SOFTMAX.atol)
    distinct = set()
    for u in (0.0, 0.1, 0.35, 0.6, 0.9, 0.999):
        for top_p in (0.3, 0.9, 1.0):
            token = s.sample(probs.reshape(1, -1), u, top_p)
            assert token == _nucleus_reference(probs.reshape(-1), u, top_p), (u, top_p)
            distinct.add(token)
    assert len(distinct) > 3  # the draws really depend on u and top_p


def test_logit_processors_edit_logits_in_place(sampler_session):
    s = sampler_session
    assert set(SAMPLER_FUNCTIONS) == {"softmax_with_temperature", "argsort_probs", "sample_with_top_p",
                                      "apply_bitmask_inplace", "apply_penalty_inplace",
                                      "apply_logit_bias_inplace"}
    vocab = TINY["vocab_size"]
    logits = np.random.default_rng(4).normal(size=(1, vocab)).astype("float32")
    i32 = lambda *v: s.tensor(np.array(v, "int32"))  # noqa: E731

    t = s.tensor(logits)
    s.vm["apply_logit_bias_inplace"](t, i32(0, 0), i32(3, 7), s.tensor(np.array([5.0, -2.0], "float32")))
    want = logits.copy()
    want[0, 3] += 5.0
    want[0, 7] -= 2.0
    np.testing.assert_array_equal(t.numpy(), want)

    t = s.tensor(logits)
    presence, frequency, repetition = 0.5, 0.25, 1.3
    s.vm["apply_penalty_inplace"](t, i32(0), i32(0, 0), i32(3, 7), i32(1, 2),
                                  s.tensor(np.array([[presence, frequency, repetition]], "float32")))
    want = logits.copy()
    for token, count in ((3, 1), (7, 2)):
        v = want[0, token] - presence - count * frequency
        want[0, token] = v * repetition if v < 0 else v / repetition
    np.testing.assert_allclose(t.numpy(), want, rtol=WEBLLM_PENALTY.rtol)

    t = s.tensor(logits)
    allowed = [5, 31, 65, 255]
    words = np.zeros((1, -(-vocab // 32)), "uint32")
    for token in allowed:
        words[0, token // 32] |= np.uint32(1 << (token % 32))
    s.vm["apply_bitmask_inplace"](t, i32(0), s.tensor(words.view("int32")))
    got = t.numpy()
    assert np.flatnonzero(got[0] > np.finfo("float32").min).tolist() == allowed
    np.testing.assert_array_equal(got[0, allowed], logits[0, allowed])


# The WebGPU build, link and its cache are tested where the library is also run in chromium through
# web-llm (tests/runtimes/test_webllm_runtime.py): one link per library, minutes each on 2 cores.
