"""MLC-format weights (exporters.webllm: quant, families, tensor_cache, weights, reference).

Setup: tiny random Llama (tied, and untied with hidden 48 so groups of 32 are padded) and Qwen2
(with the qkv bias, intermediate 96) checkpoints written at test time, converted once per
quantisation. Assert: record names / shapes / dtypes against a table written here from the HF
shapes, the group codec against hand-computed words, the tensor cache against tvm.contrib.tvmjs
(writer bytes and loader), and the NumPy reference forward against transformers.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from exporters.hf import TensorMismatchError  # noqa: E402
from exporters.webllm import families  # noqa: E402
from exporters.webllm.families import family_for, plan  # noqa: E402
from exporters.webllm.quant import (  # noqa: E402
    QUANTS,
    dequantize_group,
    quantize_group,
    unpack_group,
)
from exporters.webllm.reference import logit_agreement, reference_logits, torch_logits  # noqa: E402
from exporters.webllm.tensor_cache import (  # noqa: E402
    ENCODE_F32_TO_BF16,
    ENCODE_RAW,
    load_tensor_cache,
    read_index,
    write_tensor_cache,
)
from exporters.webllm.weights import convert  # noqa: E402
from tests.tolerances import (  # noqa: E402
    WEBLLM_REFERENCE_EXACT,
    WEBLLM_REFERENCE_Q0F16,
    WEBLLM_REFERENCE_Q4,
)
from toolchain.core.errors import PreflightError  # noqa: E402

SEQ = 24
VOCAB = 256
MODELS = {
    "llama-tied": ("llama", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                                 tie_word_embeddings=True)),
    # hidden 48: every [*, 48] weight has a padded second group (48 = 32 + 16)
    "llama-untied-48": ("llama", dict(hidden_size=48, intermediate_size=96, num_attention_heads=4,
                                      num_key_value_heads=1, tie_word_embeddings=False)),
    "qwen2-bias": ("qwen2", dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                                 tie_word_embeddings=False)),
}


def _build(kind: str, extra: dict, out, seed: int = 0):
    """A tiny model with unit-scale weights (default init makes logits nearly flat)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=128, rope_theta=100000.0, **extra)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                std = 1.0 if "embed_tokens" in name else p.shape[1] ** -0.5
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            else:  # norms: around 1, not exactly 1 (a norm read from the wrong place would show)
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
    model.eval().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {key: _build(kind, extra, tmp_path_factory.mktemp(key)) for key, (kind, extra) in MODELS.items()}


@pytest.fixture(scope="module")
def converted(models, tmp_path_factory):
    out = {}
    for key, model_dir in models.items():
        for q in QUANTS:
            dest = tmp_path_factory.mktemp(f"{key}-{q}")
            out[key, q] = (dest, convert(model_dir, dest, q))
    return out


def _ids(seed: int = 3) -> list[int]:
    return np.random.default_rng(seed).integers(0, VOCAB, SEQ).tolist()


# --- quantisation table and codec --------------------------------------------------------------

def test_quant_table_is_mlc_llms():
    for name, dtype in (("q0f32", "float32"), ("q0f16", "float16")):
        assert (QUANTS[name].kind, QUANTS[name].model_dtype, QUANTS[name].is_group) == ("no-quant", dtype, False)
    for name, dtype in (("q4f32_1", "float32"), ("q4f16_1", "float16")):
        s = QUANTS[name]
        assert (s.kind, s.model_dtype, s.bits, s.group_size, s.storage_dtype, s.layout) == \
            ("group-quant", dtype, 4, 32, "uint32", "NK")
        assert (s.elems_per_storage, s.storage_per_group, s.max_int) == (8, 4, 7)
        assert s.quantize_embedding and s.quantize_final_fc
        assert s.q_weight_shape(10, 48) == (10, 8) and s.q_scale_shape(10, 48) == (10, 2)


@pytest.mark.parametrize("quant", ["q4f32_1", "q4f16_1"])
def test_codec_packs_like_mlc_llm(quant):
    spec = QUANTS[quant]
    w = np.zeros((3, 40), np.float32)
    w[0, :32] = (np.arange(32) % 15 - 7) * 0.5  # max 3.5 -> scale 0.5 -> q = arange % 15
    w[0, 32:34] = [1.0, -1.0]  # the padded group (8 real values): max 1 -> q 14, 0, then 7s
    w[1, :5] = [7.0, 0.5, 1.5, -0.5, 2.5]  # scale 1: ties 7.5, 8.5, 6.5, 9.5 round half to even
    # row 2 stays zero: scale 0, 0/0 is NaN and ends as q 0
    q_weight, q_scale = quantize_group(w, spec)
    assert q_weight.dtype == np.uint32 and q_weight.shape == (3, 8)
    assert q_scale.dtype == np.dtype(spec.model_dtype) and q_scale.shape == (3, 2)
    # first element in the lowest nibble; padding nibbles are 0, not 7
    assert [hex(v) for v in q_weight[0]] == ["0x76543210", "0xedcba98", "0x87654321", "0x10edcba9",
                                             "0x7777770e", "0x0", "0x0", "0x0"]
    assert unpack_group(q_weight, spec)[1, :5].tolist() == [14, 8, 8, 6, 10]
    assert q_weight[2].tolist() == [0] * 8 and q_scale[2].tolist() == [0, 0]
    assert q_scale[0, 0] == 0.5 and q_scale[0, 1] == np.asarray(1.0, spec.model_dtype) / np.asarray(7, spec.model_dtype)
    back = dequantize_group(q_weight, q_scale, spec, in_features=40)
    np.testing.assert_array_equal(back[0, :32], w[0, :32])  # exactly representable: exact round trip
    assert back.shape == (3, 40) and not back[2].any()


def test_codec_against_tvm_compute():
    """TVM (apache-tvm's LLVM CPU build, what mlc-llm quantises with by default) computing the
    documented formula agrees bit for bit, float16 half-way cases included."""
    tvm = pytest.importorskip("tvm")
    from tvm import te
    from tvm import tirx as tir

    n, k, g = 300, 40, 32
    for quant in ("q4f32_1", "q4f16_1"):
        spec, dt = QUANTS[quant], QUANTS[quant].model_dtype
        w = te.placeholder((n, k), dt, name="w")
        r = te.reduce_axis((0, g), name="r")
        mx = te.compute((n, 2), lambda i, j: te.max(tir.if_then_else(j * g + r < k, te.abs(w[i, j * g + r]),
                                                                     te.min_value(dt)), axis=r))
        sc = te.compute((n, 2), lambda i, j: mx[i, j] / tir.const(7, dt))
        q = te.compute((n, k), lambda i, j: tir.min(tir.max(tir.round(w[i, j] / sc[i, j // g] + tir.const(7, dt)),
                                                            tir.const(0, dt)), tir.const(14, dt)).astype("uint32"))
        lib = tvm.compile(tvm.IRModule({"main": te.create_prim_func([w, sc, q])}), target="llvm")
        x = (np.random.default_rng(0).standard_normal((n, k)) * 0.05).astype(dt)
        tw, ts, tq = tvm.runtime.tensor(x), tvm.runtime.empty((n, 2), dt), tvm.runtime.empty((n, k), "uint32")
        lib["main"](tw, ts, tq)
        q_weight, q_scale = quantize_group(x.astype(np.float32), spec)
        np.testing.assert_array_equal(q_scale, ts.numpy())
        np.testing.assert_array_equal(unpack_group(q_weight, spec)[:, :k], tq.numpy())


# --- tensor cache --------------------------------------------------------------------------------

def _cache_params():
    rng = np.random.default_rng(0)
    return [("a", rng.standard_normal((16, 8)).astype(np.float32)),  # 512 B
            ("big", rng.integers(0, 2**32, (160,), dtype=np.uint32)),  # 640 B: out of band at cap 1024
            ("b", rng.standard_normal((100,)).astype(np.float16)),  # 200 B
            ("c", rng.standard_normal((90,)).astype(np.float32)),  # 360 B: closes the pending shard
            # beyond bf16's largest finite value (~3.3895e38) tvmjs truncates instead of rounding
            ("d", np.array([[3.389e38, 3.4e38, -3.4e38], [1.0, -2.5, 0.1]], np.float32))]


@pytest.mark.parametrize("encoding", [ENCODE_RAW, ENCODE_F32_TO_BF16])
def test_tensor_cache_matches_tvmjs_byte_for_byte(tmp_path, encoding):
    tvmjs = pytest.importorskip("tvm.contrib.tvmjs")
    import tvm

    meta = {"ParamSize": 5, "ParamBytes": 1.0, "BitsPerParam": 2.0}
    mine = write_tensor_cache(_cache_params(), tmp_path / "mine", metadata=lambda: meta, encoding=encoding,
                              shard_cap_bytes=1024)
    tvmjs.dump_tensor_cache(iter(_cache_params()), str(tmp_path / "tvm"), encode_format=encoding, meta_data=meta,
                            shard_cap_mb=1 / 1024, show_progress=False)
    if encoding == ENCODE_RAW:  # out of band first, then the pending shard closed by "c"
        assert [[r["name"] for r in s["records"]] for s in mine["records"]] == [["big"], ["a", "b"], ["c", "d"]]
    names = sorted(p.name for p in (tmp_path / "tvm").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "mine").iterdir())
    for name in names:
        assert (tmp_path / "mine" / name).read_bytes() == (tmp_path / "tvm" / name).read_bytes(), name
    ours, ours_meta = load_tensor_cache(tmp_path / "mine")
    theirs, theirs_meta = tvmjs.load_tensor_cache(str(tmp_path / "mine"), tvm.cpu())
    assert ours_meta == theirs_meta == meta and set(ours) == set(theirs)
    for name, arr in ours.items():
        np.testing.assert_array_equal(arr, theirs[name].numpy())
    if encoding == ENCODE_RAW:
        for name, arr in _cache_params():
            np.testing.assert_array_equal(ours[name], arr)


def test_tensor_cache_loader_rejects_a_corrupt_shard(tmp_path):
    write_tensor_cache(_cache_params(), tmp_path, shard_cap_bytes=1024)
    shard = tmp_path / "params_shard_1.bin"
    data = bytearray(shard.read_bytes())
    data[3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="md5sum"):
        load_tensor_cache(tmp_path)


# --- conversion ------------------------------------------------------------------------------------

def _expected_records(model_dir, quant: str) -> dict[str, tuple[list[int], str]]:
    """What mlc-llm's convert_weight stores, written from the HF shapes (not from the family code)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    spec, qwen = QUANTS[quant], cfg["model_type"] == "qwen2"
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    qkv = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * d
    attn = "c_attn" if qwen else "qkv_proj"
    mats = {"model.embed_tokens": (v, h)}
    vecs = {"model.norm.weight": h}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        mats.update({f"{p}.self_attn.{attn}": (qkv, h), f"{p}.self_attn.o_proj": (h, h),
                     f"{p}.mlp.gate_up_proj": (2 * f, h), f"{p}.mlp.down_proj": (h, f)})
        vecs.update({f"{p}.input_layernorm.weight": h, f"{p}.post_attention_layernorm.weight": h})
        if qwen:
            vecs[f"{p}.self_attn.c_attn.bias"] = qkv
    if not cfg["tie_word_embeddings"]:
        mats["lm_head"] = (v, h)
    out = {name: ([n], spec.model_dtype) for name, n in vecs.items()}
    for base, (rows, cols) in mats.items():
        if spec.is_group:
            groups = math.ceil(cols / 32)
            out[f"{base}.q_weight"] = ([rows, groups * 4], "uint32")
            out[f"{base}.q_scale"] = ([rows, groups], spec.model_dtype)
        else:
            out[f"{base}.weight"] = ([rows, cols], spec.model_dtype)
    return out


@pytest.mark.parametrize("quant", list(QUANTS))
@pytest.mark.parametrize("key", list(MODELS))
def test_records_are_mlc_llms(models, converted, key, quant):
    out_dir, summary = converted[key, quant]
    index = read_index(out_dir)
    recs = [r for s in index["records"] for r in s["records"]]
    assert {r["name"]: (r["shape"], r["dtype"]) for r in recs} == _expected_records(models[key], quant)
    # mlc-llm's loading order: the checkpoint's sorted names, each parameter at its first source
    names = [r["name"] for r in recs]
    first = "lm_head" if "lm_head.q_weight" in names or "lm_head.weight" in names else "model.embed_tokens"
    assert names[0].startswith(first) and names[-1] == "model.norm.weight"
    if QUANTS[quant].is_group:
        assert names.index(f"{first}.q_weight") + 1 == names.index(f"{first}.q_scale")
    encoding = ENCODE_F32_TO_BF16 if QUANTS[quant].model_dtype == "float16" else ENCODE_RAW
    assert {r["format"] for r in recs} == {encoding}
    meta = index["metadata"]
    n_params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(models[key]).parameters())
    nbytes = sum(math.prod(r["shape"]) * np.dtype(r["dtype"]).itemsize for r in recs)
    assert meta == {"ParamSize": len(recs), "ParamBytes": float(nbytes), "BitsPerParam": nbytes * 8.0 / n_params}
    assert summary["param_count"] == n_params and summary["quant"] == quant


def test_loaders_agree_with_tvmjs(converted):
    tvmjs = pytest.importorskip("tvm.contrib.tvmjs")
    import tvm

    for (key, quant), (out_dir, _) in converted.items():
        ours, meta = load_tensor_cache(out_dir)
        theirs, their_meta = tvmjs.load_tensor_cache(str(out_dir), tvm.cpu())
        assert meta == their_meta and set(ours) == set(theirs), (key, quant)
        for name, arr in ours.items():
            np.testing.assert_array_equal(arr, theirs[name].numpy(), err_msg=f"{key} {quant} {name}")


# --- the reference forward -----------------------------------------------------------------------

def _mirrored_logits(model_dir, quant: str, ids: list[int]) -> np.ndarray:
    """transformers with every weight replaced by what the MLC files decode to (model-dtype cast,
    group quantisation of every matrix, embedding and lm_head included)."""
    spec = QUANTS[quant]
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            w = p.numpy().astype(spec.model_dtype)
            if spec.is_group and p.dim() == 2:
                w = dequantize_group(*quantize_group(w, spec), spec, in_features=w.shape[1])
            p.copy_(torch.from_numpy(w.astype(np.float32)))
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("quant", list(QUANTS))
@pytest.mark.parametrize("key", list(MODELS))
def test_reference_matches_torch(models, converted, key, quant):
    out_dir, summary = converted[key, quant]
    ids = _ids()
    mine = reference_logits(out_dir, summary["model_config"], summary["model_type"], quant, ids)
    assert mine.shape == (SEQ, VOCAB)
    np.testing.assert_allclose(mine, _mirrored_logits(models[key], quant, ids), atol=WEBLLM_REFERENCE_EXACT.atol, rtol=0)
    agreement = logit_agreement(torch_logits(models[key], ids), mine)
    if quant == "q0f32":
        assert agreement["max_abs"] < WEBLLM_REFERENCE_EXACT.atol
    elif quant == "q0f16":
        assert agreement["max_abs"] < WEBLLM_REFERENCE_Q0F16.atol
    else:
        assert agreement["kl"] < WEBLLM_REFERENCE_Q4.kl and agreement["top1"] >= WEBLLM_REFERENCE_Q4.top1, agreement


# --- config and errors ---------------------------------------------------------------------------

def test_model_config_reads_rope_theta_from_rope_parameters():
    smollm2 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
               "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
               "num_hidden_layers": 30, "rms_norm_eps": 1e-5, "vocab_size": 49152, "tie_word_embeddings": True,
               "max_position_embeddings": 8192, "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}
    cfg = family_for(smollm2).model_config(smollm2)
    assert list(cfg) == ["hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                         "rms_norm_eps", "vocab_size", "tie_word_embeddings", "position_embedding_base",
                         "rope_scaling", "context_window_size", "prefill_chunk_size", "num_key_value_heads",
                         "head_dim", "tensor_parallel_shards", "pipeline_parallel_stages", "max_batch_size",
                         "disaggregation"]
    assert (cfg["position_embedding_base"], cfg["head_dim"], cfg["prefill_chunk_size"]) == (100000, 64, 8192)
    capped = family_for(smollm2).model_config(smollm2, context_window_size=4096, prefill_chunk_size=1024)
    assert (capped["context_window_size"], capped["prefill_chunk_size"]) == (4096, 1024)
    # a chunk above the window falls back to min(window, 8192), as mlc-llm's LlamaConfig does
    assert family_for(smollm2).model_config(smollm2, context_window_size=512, prefill_chunk_size=1024)[
        "prefill_chunk_size"] == 512
    qwen = {**smollm2, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
            "num_attention_heads": 9, "rope_parameters": None, "rope_theta": 1000000.0}
    qcfg = family_for(qwen).model_config(qwen)
    assert (qcfg["rope_theta"], qcfg["prefill_chunk_size"], qcfg["dtype"]) == (1000000, 2048, "float32")
    with pytest.raises(PreflightError, match="rope_type"):
        family_for(smollm2).model_config({**smollm2, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}})


def test_unsupported_architecture_is_named():
    with pytest.raises(PreflightError) as err:
        family_for({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    text = str(err.value)
    assert "GPT2LMHeadModel" in text and "LlamaForCausalLM" in text and "Qwen2ForCausalLM" in text and "fix:" in text
    assert set(families.FAMILIES) == {"llama", "qwen2"}


def test_missing_and_extra_tensors_are_reported_separately(models):
    from exporters.hf import Checkpoint

    model_dir = models["qwen2-bias"]
    cfg = json.loads((model_dir / "config.json").read_text())
    fam = family_for(cfg)
    shapes = dict(Checkpoint(model_dir).shapes)
    shapes.pop("model.layers.1.self_attn.k_proj.bias")
    shapes["model.layers.0.self_attn.o_proj.bias"] = (64,)
    shapes["model.norm.weight"] = (65,)
    with pytest.raises(TensorMismatchError) as err:
        plan(fam, fam.model_config(cfg), shapes)
    assert err.value.missing == ["model.layers.1.self_attn.k_proj.bias"]
    assert err.value.extra == ["model.layers.0.self_attn.o_proj.bias"]
    assert err.value.wrong_shape == [("model.norm.weight", (64,), (65,))]
