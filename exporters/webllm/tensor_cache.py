"""The MLC tensor cache: ``params_shard_N.bin`` files indexed by ``tensor-cache.json``.

Written byte-for-byte the way mlc-llm's ``convert_weight`` writes it through
``tvm.contrib.tvmjs.dump_tensor_cache`` (this module needs no TVM):

- tensors are appended, in the order given, to a shard buffer; raw little-endian bytes, no
  alignment padding (``byteOffset`` = bytes already in the shard);
- a tensor that would bring the pending shard to ``SHARD_CAP_BYTES`` (32 MiB) or more closes it
  first, unless the tensor alone is at least half the cap: then it goes alone into a shard of its
  own (``byteOffset`` 0) and the pending shard stays open;
- shard ``N`` is ``params_shard_N.bin`` (``N`` counts shards in the order they are committed);
- tensor-cache.json: ``{"metadata": {...}, "records": [shard...]}``, indent 4; a shard is
  ``{dataPath, format: "raw-shard", nbytes, records, md5sum}``, a record
  ``{name, shape, dtype, format, nbytes, byteOffset}``, ``format`` being the encoding;
- encoding ``"f32-to-bf16"`` (what mlc-llm passes) stores float32 tensors as bfloat16 bits
  (round to nearest even inside the bf16 range, truncation outside), keeping ``dtype``
  "float32"; other dtypes are stored raw under the same label. ``"raw"`` stores every tensor as
  is. When a float32 tensor is bf16-encoded, ``tensor-cache-b16.json`` is written as well (the
  same index, those records relabelled ``dtype: bfloat16, format: raw``), as tvmjs does.

Every file is written under a temporary name and renamed when whole; tensor-cache.json last.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from toolchain.core.files import write_bytes_atomic

INDEX_FILE, INDEX_B16_FILE = "tensor-cache.json", "tensor-cache-b16.json"
SHARD_PREFIX = "params_shard"
SHARD_CAP_BYTES = 32 * (1 << 20)  # tvmjs.dump_tensor_cache(shard_cap_mb=32), mlc-llm's default
SHARD_FORMAT = "raw-shard"
ENCODE_RAW, ENCODE_F32_TO_BF16 = "raw", "f32-to-bf16"
ENCODINGS = (ENCODE_RAW, ENCODE_F32_TO_BF16)
JSON_INDENT = 4
# dtype strings as TVM names them; the numpy dtype each is stored as
DTYPES = {"float32": np.float32, "float16": np.float16, "uint32": np.uint32, "int32": np.int32,
          "uint8": np.uint8, "int8": np.int8, "uint16": np.uint16}
BF16_STORAGE = np.uint16


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16): round to nearest even inside bf16's finite range,
    truncate outside it (so huge values clip to bf16's largest), as tvmjs encodes."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    limit = np.array([(np.finfo(np.float32).max.view(np.uint32) >> 16) << 16], np.uint32).view(np.float32)[0]
    inside = (x < limit) & (x > -limit)
    bias = np.where(inside, ((bits >> 16) & 1) + np.uint32(0x7FFF), np.uint32(0)).astype(np.uint32)
    return ((bits + bias) >> 16).astype(BF16_STORAGE)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def dtype_name(a: np.ndarray) -> str:
    name = np.dtype(a.dtype).name
    if name not in DTYPES:
        raise ValueError(f"dtype {name} is not one the tensor cache writer knows ({', '.join(DTYPES)})")
    return name


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _Sharder:
    """Shard buffer with tvmjs's commit rules."""

    def __init__(self, out_dir: Path, cap: int):
        self.out_dir, self.cap = out_dir, cap
        self.shards: list[dict] = []
        self.pending: list[dict] = []
        self.data = bytearray()
        self.counter = 0

    def add(self, rec: dict, data: bytes) -> None:
        if len(self.data) + len(data) >= self.cap:
            if len(data) * 2 >= self.cap:  # out of band: a shard of its own, pending stays open
                rec["byteOffset"] = 0
                self._commit(data, [rec])
                return
            self.flush()
        rec["byteOffset"] = len(self.data)
        self.pending.append(rec)
        self.data += data

    def flush(self) -> None:
        if self.data:
            self._commit(bytes(self.data), self.pending)
            self.data, self.pending = bytearray(), []

    def _commit(self, data: bytes, records: list[dict]) -> None:
        name = f"{SHARD_PREFIX}_{self.counter}.bin"
        self.counter += 1
        path = self.out_dir / name
        write_bytes_atomic(path, data)
        self.shards.append({"dataPath": name, "format": SHARD_FORMAT, "nbytes": len(data), "records": records,
                            "md5sum": _md5(path)})


def write_tensor_cache(params: Iterable[tuple[str, np.ndarray]], out_dir: str | Path,
                       metadata: dict | Callable[[], dict] | None = None, encoding: str = ENCODE_RAW,
                       shard_cap_bytes: int = SHARD_CAP_BYTES) -> dict:
    """Write ``params`` (name, array) in order; return the index written to tensor-cache.json.

    ``metadata`` may be a callable evaluated after the last tensor (as mlc-llm's is).
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for index_file in (INDEX_FILE, INDEX_B16_FILE):  # first: a half-rewritten folder has no index
        (out / index_file).unlink(missing_ok=True)
    for stale in out.glob(f"{SHARD_PREFIX}_*.bin"):
        stale.unlink()
    sharder, seen = _Sharder(out, shard_cap_bytes), set()
    for name, arr in params:
        if name in seen:
            raise ValueError(f"Duplicate name {name} found in the cache.")
        seen.add(name)
        arr = np.asarray(arr)
        dtype = dtype_name(arr)
        if encoding == ENCODE_F32_TO_BF16 and dtype == "float32":
            data = f32_to_bf16(arr).tobytes()
        else:
            data = np.ascontiguousarray(arr).astype(np.dtype(arr.dtype).newbyteorder("<"), copy=False).tobytes()
        sharder.add({"name": name, "shape": [int(s) for s in arr.shape], "dtype": dtype, "format": encoding,
                     "nbytes": len(data)}, data)
    sharder.flush()
    meta = metadata() if callable(metadata) else (metadata or {})
    index = {"metadata": meta, "records": sharder.shards}
    b16 = [r for s in sharder.shards for r in s["records"] if r["format"] == ENCODE_F32_TO_BF16
           and r["dtype"] == "float32"]
    b16_path = out / INDEX_B16_FILE
    if b16:
        relabelled = json.loads(json.dumps(index))
        for shard in relabelled["records"]:
            for r in shard["records"]:
                if r["format"] == ENCODE_F32_TO_BF16 and r["dtype"] == "float32":
                    r["format"], r["dtype"] = ENCODE_RAW, "bfloat16"
        write_bytes_atomic(b16_path, json.dumps(relabelled, indent=JSON_INDENT).encode())
    elif b16_path.exists():
        b16_path.unlink()
    write_bytes_atomic(out / INDEX_FILE, json.dumps(index, indent=JSON_INDENT).encode())
    return index


def read_index(path: str | Path) -> dict:
    p = Path(path)
    return json.loads((p / INDEX_FILE if p.is_dir() else p).read_text())


def load_tensor_cache(path: str | Path, names: Iterable[str] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Every tensor (or those in ``names``) as NumPy arrays, decoded; and the metadata.

    Pure NumPy; checks each shard's size and md5sum and each record's range.
    """
    p = Path(path)
    index_path = p / INDEX_FILE if p.is_dir() else p
    index = json.loads(index_path.read_text())
    want = None if names is None else set(names)
    out: dict[str, np.ndarray] = {}
    for shard in index["records"]:
        recs = [r for r in shard["records"] if want is None or r["name"] in want]
        if not recs:
            continue
        if shard["format"] != SHARD_FORMAT:
            raise ValueError(f"{index_path}: shard {shard['dataPath']} has format {shard['format']!r}, "
                             f"expected {SHARD_FORMAT!r}")
        shard_path = index_path.parent / shard["dataPath"]
        raw = shard_path.read_bytes()
        if len(raw) != shard["nbytes"]:
            raise ValueError(f"{shard_path}: {len(raw)} bytes, the index says {shard['nbytes']}")
        if "md5sum" in shard and hashlib.md5(raw).hexdigest() != shard["md5sum"]:
            raise ValueError(f"{shard_path}: md5sum differs from the index (a corrupt or partial file)")
        for r in recs:
            start, n = r["byteOffset"], r["nbytes"]
            if start < 0 or start + n > len(raw):
                raise ValueError(f"{index_path}: record {r['name']} [{start}, {start + n}) exceeds its shard")
            buf = raw[start:start + n]
            shape = tuple(r["shape"])
            if r["dtype"] == "float32" and r["format"] == ENCODE_F32_TO_BF16:
                arr = bf16_to_f32(np.frombuffer(buf, dtype=BF16_STORAGE))
            elif r["dtype"] == "bfloat16":
                arr = bf16_to_f32(np.frombuffer(buf, dtype=BF16_STORAGE))
            else:
                arr = np.frombuffer(buf, dtype=np.dtype(DTYPES[r["dtype"]]).newbyteorder("<"))
            if arr.size != math.prod(shape):
                raise ValueError(f"{index_path}: record {r['name']} holds {arr.size} values, shape {list(shape)}")
            out[r["name"]] = arr.reshape(shape).copy()
    if want is not None and want - set(out):
        raise KeyError(f"{index_path}: no record for {sorted(want - set(out))}")
    return out, index["metadata"]


def records(index: dict) -> list[dict]:
    """The tensor records of an index, flattened, each with its shard's dataPath."""
    return [{**r, "dataPath": s["dataPath"]} for s in index["records"] for r in s["records"]]
