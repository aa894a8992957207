"""Quantise a GGUF file with llama.cpp's own quantiser (``llama_model_quantize``), optionally
guided by an importance matrix.

How the importance matrix reaches the quantiser: ``llama.h`` (llama.cpp as vendored by
llama-cpp-python 0.3.36) declares ``llama_model_quantize_params.imatrix`` as a plain C pointer to
an array of ``struct llama_model_imatrix_data {const char *name; const float *data; size_t size;}``
ended by an entry whose ``name`` is NULL; llama-cpp-python mirrors that struct in ctypes. So the
array is built here in ctypes, one entry per weight tensor, each ``data`` pointing at a float32
numpy buffer that stays alive for the call: no C++ shim is needed. Each entry holds what
``llama-quantize --imatrix`` hands over after loading a file: the per-input-column *mean* of x^2
(the stored sum divided by the token count; a zero count gives ones), see
``tools/quantize/quantize.cpp`` ``load_imatrix``.

Like llama-quantize, the output's metadata records the imatrix (``quantize.imatrix.*`` keys,
through ``kv_overrides``). The file is written to a temporary name beside the destination and
renamed into place only when llama.cpp reports success.
"""
from __future__ import annotations

import ctypes
import math
import struct
import time
from pathlib import Path

import numpy as np

from exporters.gguf.quant_types import QuantType, get_quant_type
from toolchain.core.errors import ModelSourceError, PreflightError, StageError
from toolchain.core.files import atomic_path

# llama.cpp's metadata keys for imatrix provenance (tools/quantize/quantize.cpp LLM_KV_QUANTIZE_*)
KV_IMATRIX_FILE = "quantize.imatrix.file"
KV_IMATRIX_DATASET = "quantize.imatrix.dataset"
KV_IMATRIX_N_ENTRIES = "quantize.imatrix.entries_count"
KV_IMATRIX_N_CHUNKS = "quantize.imatrix.chunks_count"
KV_STR_MAX = 127  # llama_model_kv_override.val_str is char[128]
GGUF_DEFAULT_ALIGNMENT = 32  # gguf.h GGUF_DEFAULT_ALIGNMENT, unless general.alignment says otherwise

# GGUF general.file_type values of unquantised sources (enum llama_ftype)
FLOAT_FILE_TYPES = {0: "F32", 1: "F16", 32: "BF16"}


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise PreflightError("GGUF quantisation needs llama-cpp-python (fix: install the llama-cpp-python "
                             "wheel, see the README's GGUF section)") from None
    return llama_cpp


# GGUF value type id -> struct format of a scalar (gguf.h enum gguf_type); 8 = string, 9 = array
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read_gguf_header(path) -> tuple[dict, list[tuple[str, tuple[int, ...], int, int]], int]:
    """(scalar and string metadata, [(tensor name, ne dims, ggml type id, byte offset in the data
    section)], data section start) of a GGUF file.

    Reads the header only (gguf-py's GGUFReader also maps every array item, seconds per file);
    arrays are skipped and left out of the metadata.
    """
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:4] != b"GGUF":
            raise ModelSourceError(f"{path} is not a GGUF file (bad magic {bytes(mm[:4])!r})")
        off = 8
        n_tensors, n_kv = struct.unpack_from("<QQ", mm, off)
        off += 16

        def string(o):
            (n,) = struct.unpack_from("<Q", mm, o)
            return mm[o + 8:o + 8 + n].decode("utf-8", "replace"), o + 8 + n

        def value(t, o):
            if t == 8:
                return string(o)
            if t == 9:
                item, n = struct.unpack_from("<IQ", mm, o)
                o += 12
                if item in _GGUF_SCALARS:
                    return None, o + n * struct.calcsize("<" + _GGUF_SCALARS[item])
                for _ in range(n):
                    _, o = value(item, o)
                return None, o
            fmt = "<" + _GGUF_SCALARS[t]
            return struct.unpack_from(fmt, mm, o)[0], o + struct.calcsize(fmt)

        meta = {}
        for _ in range(n_kv):
            key, off = string(off)
            (vtype,), off = struct.unpack_from("<I", mm, off), off + 4
            val, off = value(vtype, off)
            if val is not None:
                meta[key] = val
        tensors = []
        for _ in range(n_tensors):
            name, off = string(off)
            (nd,) = struct.unpack_from("<I", mm, off)
            dims = struct.unpack_from(f"<{nd}Q", mm, off + 4)
            ttype, offset = struct.unpack_from("<IQ", mm, off + 4 + 8 * nd)
            off += 4 + 8 * nd + 12
            tensors.append((name, tuple(dims), ttype, offset))
    align = int(meta.get("general.alignment", GGUF_DEFAULT_ALIGNMENT))
    return meta, tensors, -(-off // align) * align


def source_file_type(path: Path) -> int | None:
    """The ``general.file_type`` (enum llama_ftype) recorded in a GGUF file, None when absent."""
    return read_gguf_header(path)[0].get("general.file_type")


def _block_count(path: Path) -> int | None:
    meta = read_gguf_header(path)[0]
    arch = meta.get("general.architecture")
    return meta.get(f"{arch}.block_count")


def imatrix_means(imatrix) -> dict[str, np.ndarray]:
    """Per tensor, the float32 mean of x^2 that the quantiser takes, from ``{name: (sum2, count)}``."""
    out = {}
    for name, (sum2, count) in imatrix.items():
        sum2 = np.asarray(sum2, dtype=np.float64).reshape(-1)
        mean = sum2 / count if count > 0 else np.ones_like(sum2)
        if not np.all(np.isfinite(mean)):
            raise StageError(f"importance matrix entry {name!r} holds non-finite values "
                             "(fix: recompute it; check the calibration run for overflow)")
        out[name] = np.ascontiguousarray(mean, dtype=np.float32)
    return out


def _check_imatrix_fits(means: dict[str, np.ndarray], src: Path) -> list[str]:
    """Refuse an imatrix made for another model (llama.cpp would silently skip unknown names);
    return the layer weights it has no entry for (those are quantised without one)."""
    cols = {name: dims[0] for name, dims, _t, _o in read_gguf_header(src)[1] if len(dims) >= 2}
    unknown = sorted(set(means) - set(cols))
    wrong = sorted(n for n in means if n in cols and means[n].size != cols[n])
    if unknown or wrong:
        raise PreflightError(
            f"the importance matrix does not fit {src.name}: {len(unknown)} name(s) not in the model "
            f"{unknown[:3]}, {len(wrong)} with a wrong column count "
            f"{[(n, means[n].size, cols[n]) for n in wrong[:3]]} (fix: compute it on this model, with the "
            "family that matches its architecture)")
    return sorted(n for n in cols if n.startswith("blk.") and n not in means)


def _imatrix_array(lc, means: dict[str, np.ndarray]):
    """A NULL-terminated ctypes array of llama_model_imatrix_data over ``means``' buffers
    (the caller must keep ``means`` and the returned names alive during the call)."""
    arr = (lc.llama_model_imatrix_data * (len(means) + 1))()
    names = []
    for i, (name, data) in enumerate(sorted(means.items())):
        names.append(name.encode())
        arr[i].name = names[-1]
        arr[i].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = data.size
    arr[len(means)].name = None  # terminator
    return arr, names


def _kv_overrides(lc, items: list[tuple[str, object]]):
    """A ctypes kv-override array (ended by an empty key) for string and integer values."""
    arr = (lc.llama_model_kv_override * (len(items) + 1))()
    for i, (key, value) in enumerate(items):
        arr[i].key = key.encode()
        if isinstance(value, int):
            arr[i].tag = lc.LLAMA_KV_OVERRIDE_TYPE_INT
            arr[i].value.val_i64 = value
        else:
            arr[i].tag = lc.LLAMA_KV_OVERRIDE_TYPE_STR
            arr[i].value.val_str = str(value).encode()[:KV_STR_MAX]
    arr[len(items)].key = b""
    return arr


class _CapturedLog:
    """Collect llama.cpp's log lines during a call (shown on failure), restoring
    llama-cpp-python's own callback afterwards."""

    def __init__(self, lc, echo: bool):
        self.lc, self.echo, self.lines = lc, echo, []

        @lc.llama_log_callback
        def _cb(level, text, user_data):
            s = text.decode("utf-8", "replace")
            self.lines.append(s)
            if echo:
                print(s, end="", flush=True)

        self._cb = _cb

    def __enter__(self):
        self.lc.llama_log_set(self._cb, ctypes.c_void_p(0))
        return self

    def __exit__(self, *exc):
        from llama_cpp import _logger
        self.lc.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))

    def tail(self, n: int = 15) -> list[str]:
        return "".join(self.lines).strip().splitlines()[-n:]


def gguf_summary(path: Path) -> dict:
    """Parameter count, tensor type histogram, and the bits per weight the repeating layers'
    matrices (``blk.*``, 2-d) take on disk, measured from the tensor data offsets."""
    from gguf import GGMLQuantizationType

    _meta, tensors, data_start = read_gguf_header(path)
    ends = sorted(t[3] for t in tensors)[1:] + [Path(path).stat().st_size - data_start]
    span = dict(zip(sorted(t[3] for t in tensors), ends))  # offset -> end of its (padded) data
    types: dict[str, int] = {}
    n_params = layer_params = layer_bytes = 0
    for name, dims, ttype, offset in tensors:
        tname = GGMLQuantizationType(ttype).name
        types[tname] = types.get(tname, 0) + 1
        n_params += math.prod(dims)
        if name.startswith("blk.") and len(dims) == 2:
            layer_params += math.prod(dims)
            layer_bytes += span[offset] - offset
    return {"n_params": n_params, "tensor_types": dict(sorted(types.items())),
            "layer_bits_per_weight": round(layer_bytes * 8 / layer_params, 4) if layer_params else None}


def quantize(src_gguf, dst_gguf, qtype: str | QuantType, imatrix_path=None, threads: int = 2, *,
             imatrix=None, allow_requantize: bool = False, prune_layers=None, verbose: bool = False) -> dict:
    """Quantise ``src_gguf`` into ``dst_gguf`` as ``qtype`` with llama.cpp's quantiser.

    ``imatrix_path`` is an importance-matrix file (llama.cpp's GGUF format or legacy ``.dat``);
    ``imatrix`` may instead be the ``{name: (sum2, count)}`` mapping from
    ``toolchain.core.imatrix.compute_imatrix``. ``allow_requantize`` lets a source that is
    already quantised be re-quantised (its weights are dequantised first; quality is bounded by
    the source's). ``prune_layers`` lists decoder layers (``blk.N``) llama.cpp drops while
    quantising, renumbering the rest. Returns a summary dict (sizes, bits per weight, tensor types, imatrix use).
    """
    lc = _llama_cpp()
    q = get_quant_type(qtype)
    src, dst = Path(src_gguf), Path(dst_gguf)
    if not src.is_file():
        raise ModelSourceError(f"GGUF source {str(src)!r} does not exist (fix: write the F16/F32 GGUF first)")
    if not isinstance(threads, int) or threads < 1:
        raise PreflightError(f"`threads` must be a positive integer, got {threads!r}")
    if imatrix_path is not None and imatrix is not None:
        raise PreflightError("pass either `imatrix_path` or `imatrix`, not both")
    src_type = source_file_type(src)
    if src_type not in FLOAT_FILE_TYPES and src_type is not None and not allow_requantize:
        raise PreflightError(
            f"{src.name} is already quantised (general.file_type {src_type}); re-quantising it loses quality "
            "(fix: quantise from an F16/F32 GGUF, or pass allow_requantize=True)")

    meta: dict = {}
    if imatrix_path is not None:
        from toolchain.core.imatrix import load_imatrix
        imatrix = load_imatrix(imatrix_path)
    if imatrix is not None:
        meta = dict(getattr(imatrix, "meta", {}) or {})
        if not imatrix:
            raise StageError("the importance matrix is empty (fix: recompute it on calibration text)")
    means = imatrix_means(imatrix) if imatrix is not None and q.uses_imatrix else None
    missing = _check_imatrix_fits(means, src) if means else []

    params = lc.llama_model_quantize_default_params()
    params.ftype = q.ftype
    params.nthread = threads
    params.allow_requantize = bool(allow_requantize)
    keep_alive = []
    if prune_layers:
        layers = sorted({int(i) for i in prune_layers})
        n_layer = _block_count(src)
        if layers[0] < 0 or (n_layer is not None and layers[-1] >= n_layer):
            raise PreflightError(f"`prune_layers` must be layer indices in [0, {n_layer}), got {list(prune_layers)!r}")
        pl = (ctypes.c_int32 * (len(layers) + 1))(*layers, -1)  # -1 ends the list
        params.prune_layers = pl
        keep_alive.append(pl)
    if means:
        arr, names = _imatrix_array(lc, means)
        params.imatrix = arr
        datasets = meta.get("datasets") or []
        kv = [(KV_IMATRIX_FILE, str(imatrix_path) if imatrix_path else "<computed in memory>"),
              (KV_IMATRIX_N_ENTRIES, len(means))]
        if datasets:
            kv.append((KV_IMATRIX_DATASET, datasets[0]))
        if meta.get("chunk_count"):
            kv.append((KV_IMATRIX_N_CHUNKS, int(meta["chunk_count"])))
        overrides = _kv_overrides(lc, kv)
        params.kv_overrides = overrides
        keep_alive += [arr, names, overrides, means]

    dst.parent.mkdir(parents=True, exist_ok=True)
    lc.llama_backend_init()
    t0 = time.perf_counter()
    with atomic_path(dst) as tmp:
        with _CapturedLog(lc, verbose) as log:
            rc = lc.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0 or not tmp.is_file():
            raise StageError(f"llama.cpp could not quantise {src.name} to {q.name} (return code {rc}); "
                             "its last log lines:\n  " + "\n  ".join(log.tail()))
    seconds = time.perf_counter() - t0
    del keep_alive

    summary = gguf_summary(dst)
    size = dst.stat().st_size
    return {
        "src": str(src), "dst": str(dst), "qtype": q.name, "ftype": q.ftype,
        "source_file_type": src_type, "threads": threads,
        "size_bytes": size,
        "bits_per_weight": round(size * 8 / max(summary["n_params"], 1), 4),
        "nominal_bits_per_weight": q.bits_per_weight,
        "n_params": summary["n_params"], "tensor_types": summary["tensor_types"],
        "layer_bits_per_weight": summary["layer_bits_per_weight"], "pruned_layers": sorted(prune_layers or []),
        "imatrix": {"used": bool(means), "entries": len(means or {}), "weights_without_entry": missing,
                    "file": str(imatrix_path) if imatrix_path else None,
                    "ignored_by_type": imatrix is not None and not q.uses_imatrix, **meta},
        "seconds": round(seconds, 3),
    }
