"""Importance matrix for llama.cpp's quantiser, computed with torch on the Hugging Face model.

What llama-imatrix accumulates (tools/imatrix/imatrix.cpp, ``IMatrixCollector::collect_imatrix``):
for every matrix multiplication whose weight is a ``blk.*`` tensor (plus ``output.weight`` only
with ``--process-output``, off by default), the input activations x (one row per token) give,
per input column j, ``in_sum2[j] += x_j^2`` summed over all tokens, and ``counts += n_tokens``.
Multiplications with fewer than 16 token rows are skipped. The GGUF file stores those raw sums
and counts; ``llama-quantize`` hands the quantiser their ratio, the mean of x^2 per column
(``exporters.gguf.quantize.imatrix_means``). Per-expert (MoE, ``MUL_MAT_ID``) accumulation is not
implemented: one sum and one count per weight matrix.

Here a forward pre-hook on each ``nn.Linear`` of the decoder layers sees the same input x (the
normed hidden state for q/k/v and gate/up, the attention output for o, the gated activation for
down). Input columns are never permuted by the GGUF conversion (only q/k output rows are), so the
sums apply to the GGUF tensors as they are. Hugging Face module names map to GGUF tensor names
through ``LAYER_TENSORS``, one table per family.

File formats (both read by ``llama-quantize --imatrix``, ``common/imatrix-loader.cpp``):
GGUF (default): ``general.type = imatrix``, ``imatrix.datasets`` / ``imatrix.chunk_count`` /
``imatrix.chunk_size``, and per weight ``<name>.in_sum2`` (F32, ne = [n_cols, 1]) and
``<name>.counts`` (F32, ne = [1, 1]). Legacy ``.dat``: int32 entry count, then per entry the
name, ncall = ceil(count / chunk_size) and ``sum2 / count * ncall``, then chunk count and the
dataset name.
"""
from __future__ import annotations

import math
import re
import struct
from pathlib import Path

import numpy as np

from toolchain.core.errors import ModelSourceError, PreflightError, StageError
from toolchain.core.files import atomic_path

MIN_ROWS = 16  # llama-imatrix ignores multiplications with fewer token rows ("small batches")
GGUF_MAGIC = b"GGUF"
KV_TYPE, KV_DATASETS = "general.type", "imatrix.datasets"
KV_CHUNK_COUNT, KV_CHUNK_SIZE = "imatrix.chunk_count", "imatrix.chunk_size"
SUM2_SUFFIX, COUNTS_SUFFIX = ".in_sum2", ".counts"
DEFAULT_DATASET = "edgesmith-calibration"

# family -> {module path inside decoder layer i: GGUF tensor name inside blk.i}
LAYER_TENSORS: dict[str, dict[str, str]] = {
    "llama": {  # Llama, Mistral, Qwen2, Gemma3 (text) use the same projection names
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    },
    "phi3": {  # fused projections: llama.cpp keeps them fused under these names
        "self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output",
        "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    },
}
# config.json model_type -> family key of LAYER_TENSORS
FAMILIES: dict[str, str] = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "gemma3": "llama",
                            "gemma3_text": "llama", "phi3": "phi3"}
OUTPUT_MODULE, OUTPUT_TENSOR = "lm_head", "output.weight"
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


class ImatrixData(dict):
    """``{gguf tensor name: (sum of x^2 per input column as float64 array, token count)}`` plus
    ``meta``: ``datasets`` (names), ``chunk_count`` and ``chunk_size`` as llama.cpp records them."""

    def __init__(self, *args, meta: dict | None = None, **kw):
        super().__init__(*args, **kw)
        self.meta = {"datasets": [DEFAULT_DATASET], "chunk_count": 0, "chunk_size": 0, **(meta or {})}


def layer_tensors(family: str) -> dict[str, str]:
    key = FAMILIES.get(family, family)
    if key not in LAYER_TENSORS:
        raise PreflightError(f"importance matrix: family must be one of {', '.join(sorted(FAMILIES))}, got "
                             f"{family!r} (fix: add its module names to LAYER_TENSORS in {__name__})")
    return LAYER_TENSORS[key]


def gguf_name(module_name: str, family: str, process_output: bool = False) -> str | None:
    """The GGUF weight name for an HF Linear module path, None for modules llama.cpp does not collect."""
    if module_name.split(".")[-1] == OUTPUT_MODULE:
        return OUTPUT_TENSOR if process_output else None
    m = _LAYER_RE.search(module_name)
    if not m:
        return None
    role = layer_tensors(family).get(m.group(2))
    return None if role is None else f"blk.{int(m.group(1))}.{role}.weight"


def chunk_tokens(ids: list[int], chunk_size: int = 512, bos_id: int | None = None) -> list[list[int]]:
    """Split a token stream into full chunks the way llama-imatrix does (the first token of each
    chunk replaced by BOS when the model adds one); a trailing partial chunk is dropped."""
    chunks = [list(ids[i:i + chunk_size]) for i in range(0, len(ids) - chunk_size + 1, chunk_size)]
    if bos_id is not None:
        for c in chunks:
            c[0] = bos_id
    return chunks


def _load_model(model_dir):
    import torch
    if isinstance(model_dir, torch.nn.Module):
        return model_dir
    from transformers import AutoModelForCausalLM

    from toolchain.core.models import resolve_source
    src = resolve_source(str(model_dir))
    if src.kind == "hf_dir":
        return AutoModelForCausalLM.from_pretrained(src.path, dtype=torch.float32).eval()
    if src.kind in ("gguf", "embedded"):  # dequantised to float by transformers; no tokenizer needed here
        return AutoModelForCausalLM.from_pretrained(str(src.path.parent), gguf_file=src.path.name,
                                                    dtype=torch.float32).eval()
    raise ModelSourceError(f"importance matrix: {model_dir!r} is not a local model directory or GGUF file")


def compute_imatrix(model_dir, token_batches: list[list[int]], family: str = "llama", *,
                    process_output: bool = False, datasets: list[str] | None = None) -> ImatrixData:
    """Accumulate llama-imatrix's statistics over ``token_batches`` (each run as one sequence).

    ``model_dir`` is a Hugging Face model directory, a ``.gguf`` file transformers can load, or an
    already loaded ``nn.Module``. ``process_output`` also collects ``output.weight`` (an untied
    ``lm_head``; llama.cpp never collects a tied one, whose weight is ``token_embd``).
    """
    import torch

    model = _load_model(model_dir)
    model_type = getattr(getattr(model, "config", None), "model_type", family)
    fam = FAMILIES.get(model_type, family) if family == "auto" else family
    layer_tensors(fam)  # refuses an unknown family before any work
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    batches = [list(map(int, b)) for b in token_batches if len(b) >= MIN_ROWS]
    if not batches:
        raise StageError(f"importance matrix: no calibration sequence has {MIN_ROWS} or more tokens, got "
                         f"lengths {[len(b) for b in token_batches][:10]} (fix: pass longer calibration text)")

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    unmapped, handles = [], []

    def make_hook(name: str):
        def hook(module, args):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1])
            if x.shape[0] < MIN_ROWS:
                return
            s = (x * x).sum(0, dtype=torch.float64)  # per-column sum of squares, accumulated in f64
            sums[name] = s if name not in sums else sums[name] + s
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    for mod_name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        target = gguf_name(mod_name, fam, process_output and not tied)
        if target is None:
            if _LAYER_RE.search(mod_name):
                unmapped.append(mod_name)
            continue
        handles.append(mod.register_forward_pre_hook(make_hook(target)))
    if unmapped:
        for h in handles:
            h.remove()
        raise PreflightError(f"importance matrix: family {fam!r} has no GGUF name for {len(unmapped)} linear "
                             f"layer(s), e.g. {unmapped[:4]} (fix: pick the model's family, or add the names to "
                             f"LAYER_TENSORS)")
    if not handles:
        raise PreflightError(f"importance matrix: no linear layer of this model matches family {fam!r}")
    expected = len(handles)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for ids in batches:
                model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if len(sums) != expected:
        raise StageError(f"importance matrix: only {len(sums)} of {expected} weight matrices saw activations")

    out = ImatrixData(meta={"datasets": list(datasets or [DEFAULT_DATASET]), "chunk_count": len(batches),
                            "chunk_size": max(len(b) for b in batches)})
    for name in sorted(sums):
        arr = sums[name].cpu().numpy()
        if not np.all(np.isfinite(arr)):
            raise StageError(f"importance matrix: non-finite activations in {name}")
        out[name] = (arr, counts[name])
    return out


def save_imatrix(data: dict, path) -> Path:
    """Write ``data`` ({name: (sum2, count)}) as llama.cpp's GGUF imatrix (or legacy ``.dat``)."""
    path = Path(path)
    meta = getattr(data, "meta", None) or ImatrixData().meta
    if not data:
        raise StageError("importance matrix is empty; nothing to save")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        (_save_legacy if path.suffix == ".dat" else _save_gguf)(data, meta, tmp)
    return path


def _save_gguf(data: dict, meta: dict, path: Path) -> None:
    from gguf import GGUFWriter

    w = GGUFWriter(path, arch="imatrix")
    w.kv_data[0].pop("general.architecture", None)  # llama-imatrix writes no architecture key
    w.add_string(KV_TYPE, "imatrix")
    w.add_array(KV_DATASETS, [str(d) for d in (meta.get("datasets") or [DEFAULT_DATASET])])
    w.add_uint32(KV_CHUNK_COUNT, int(meta.get("chunk_count") or 0))
    w.add_uint32(KV_CHUNK_SIZE, int(meta.get("chunk_size") or 0))
    for name in sorted(data):
        sum2, count = data[name]
        w.add_tensor(name + SUM2_SUFFIX, np.asarray(sum2, dtype=np.float32).reshape(1, -1))
        w.add_tensor(name + COUNTS_SUFFIX, np.array([[float(count)]], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _save_legacy(data: dict, meta: dict, path: Path) -> None:
    chunk = int(meta.get("chunk_size") or 0) or max(int(c) for _, c in data.values())
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(data)))
        for name in sorted(data):
            sum2, count = data[name]
            sum2 = np.asarray(sum2, dtype=np.float64).reshape(-1)
            ncall = max(1, math.ceil(count / chunk))
            vals = (sum2 / count * ncall) if count else sum2
            raw = name.encode()
            f.write(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, vals.size))
            f.write(vals.astype("<f4").tobytes())
        dataset = str((meta.get("datasets") or [DEFAULT_DATASET])[0]).encode()
        f.write(struct.pack("<ii", int(meta.get("chunk_count") or 0), len(dataset)) + dataset)


def load_imatrix(path) -> ImatrixData:
    """Read a GGUF or legacy imatrix file into ``{name: (sum2, count)}``. For legacy files the pair
    is (mean x^2 * ncall, ncall), whose ratio is again what the quantiser takes."""
    path = Path(path)
    if not path.is_file():
        raise ModelSourceError(f"importance matrix file {str(path)!r} does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    return _load_gguf(path) if magic == GGUF_MAGIC else _load_legacy(path)


def _load_gguf(path: Path) -> ImatrixData:
    from gguf import GGUFReader

    r = GGUFReader(path)
    meta = {}
    for key, name in ((KV_DATASETS, "datasets"), (KV_CHUNK_COUNT, "chunk_count"), (KV_CHUNK_SIZE, "chunk_size")):
        fld = r.get_field(key)
        if fld is None:
            raise ModelSourceError(f"{path}: not an imatrix file with metadata (missing {key}); llama-quantize "
                                   "refuses it too (fix: recompute it with save_imatrix or llama-imatrix)")
        meta[name] = fld.contents()
    tensors = {t.name: t for t in r.tensors}
    out = ImatrixData(meta=meta)
    for tname in sorted(tensors):
        if not tname.endswith(SUM2_SUFFIX):
            continue
        base = tname[: -len(SUM2_SUFFIX)]
        counts = tensors.get(base + COUNTS_SUFFIX)
        if counts is None:
            raise ModelSourceError(f"{path}: {tname} has no matching {base + COUNTS_SUFFIX}")
        c = np.asarray(counts.data, dtype=np.float64).reshape(-1)
        if c.size != 1:
            raise ModelSourceError(f"{path}: {base} has per-expert counts ({c.size}); MoE imatrices are not supported")
        out[base] = (np.asarray(tensors[tname].data, dtype=np.float64).reshape(-1).copy(), int(round(c[0])))
    if not out:
        raise ModelSourceError(f"{path}: holds no {SUM2_SUFFIX} tensors")
    return out


def _load_legacy(path: Path) -> ImatrixData:
    buf = path.read_bytes()
    try:
        (n,), off = struct.unpack_from("<i", buf, 0), 4
        entries = {}
        for _ in range(n):
            (ln,) = struct.unpack_from("<i", buf, off)
            name = buf[off + 4: off + 4 + ln].decode()
            ncall, nval = struct.unpack_from("<ii", buf, off + 4 + ln)
            off += 12 + ln
            entries[name] = (np.frombuffer(buf, "<f4", nval, off).astype(np.float64), ncall)
            off += 4 * nval
        meta = {"datasets": [DEFAULT_DATASET], "chunk_count": 0, "chunk_size": 0}
        if off < len(buf):
            chunks, ln = struct.unpack_from("<ii", buf, off)
            meta.update(chunk_count=chunks, datasets=[buf[off + 8: off + 8 + ln].decode()] if ln > 0 else [])
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise ModelSourceError(f"{path}: neither a GGUF nor a legacy imatrix file ({e})") from None
    if n < 1:
        raise ModelSourceError(f"{path}: legacy imatrix file with no entries")
    return ImatrixData(entries, meta=meta)
