"""MLC-format weights from a merged Hugging Face checkpoint, as mlc-llm's ``convert_weight`` writes them.

- parameter names, fusions and shapes come from the family (``families/``), every source tensor
  checked (missing / extra / wrong shape reported separately);
- each parameter is cast to the quantisation's model dtype; with group quantisation every
  linear weight, the embedding and the untied lm_head become ``<name>.q_weight`` (uint32) and
  ``<name>.q_scale`` (model dtype); norms and biases stay in the model dtype. A tied model has
  no lm_head parameter: the library multiplies by the (quantised) embedding;
- the write order is mlc-llm's loading order: the checkpoint's tensor names in file order
  (a single safetensors file lists them sorted; a sharded checkpoint follows its index's
  ``weight_map``), each MLC parameter emitted at the first of its sources;
- metadata: ``ParamSize`` (records), ``ParamBytes`` (bytes of the decoded tensors, a float as
  mlc-llm writes it), ``BitsPerParam`` (``ParamBytes * 8`` over the checkpoint's parameter count).

Encoding: mlc-llm passes ``f32-to-bf16`` to tvmjs, which stores float32 tensors as bfloat16 bits
(its q0f32 and q4f32_1 folders lose float32 precision). ``ENCODING_DEFAULT`` keeps mlc-llm's label
for the float16 quantisations (nothing there is float32, so the files are byte-identical to
mlc-llm's) and writes float32 tensors ``raw`` (lossless; WebLLM reads both), so the f32 bundles
match the merged model tightly. Pass ``encoding="f32-to-bf16"`` for mlc-llm's exact q0f32/q4f32_1 bytes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

from exporters.hf import IGNORED_SUFFIXES, Checkpoint, read_config

from .families import QUANTISABLE, Family, Param, family_for, plan
from .quant import QuantSpec, quant_spec, quantize_group
from .tensor_cache import (
    ENCODE_F32_TO_BF16,
    ENCODE_RAW,
    INDEX_FILE,
    records,
    write_tensor_cache,
)

ENCODING_DEFAULT = {"float16": ENCODE_F32_TO_BF16, "float32": ENCODE_RAW}  # by model dtype, see above
Q_WEIGHT, Q_SCALE = "q_weight", "q_scale"


def is_quantised(param: Param, spec: QuantSpec) -> bool:
    return spec.is_group and param.role in QUANTISABLE and len(param.shape) == 2


def quantised_names(name: str) -> tuple[str, str]:
    """``x.weight`` -> (``x.q_weight``, ``x.q_scale``)."""
    base = name.rsplit(".", 1)[0]
    return f"{base}.{Q_WEIGHT}", f"{base}.{Q_SCALE}"


def mlc_param_specs(params: list[Param], spec: QuantSpec) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype) of every stored tensor, in mlc-llm's module order (the order a compiled
    library's ``_metadata`` lists its parameters): q_weight before q_scale, a bias after both."""
    out = []
    for p in params:
        if is_quantised(p, spec):
            qw, qs = quantised_names(p.name)
            out.append((qw, spec.q_weight_shape(*p.shape), spec.storage_dtype))
            out.append((qs, spec.q_scale_shape(*p.shape), spec.model_dtype))
        else:
            out.append((p.name, tuple(p.shape), spec.model_dtype))
    return out


def loading_order(ckpt: Checkpoint, params: list[Param]) -> list[Param]:
    """mlc-llm's HuggingFaceLoader order: checkpoint names in file order, first source wins."""
    index = ckpt.model_dir / Checkpoint.INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        by_file: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            by_file.setdefault(file, []).append(name)
        names = [n for group in by_file.values() for n in group]
    else:
        names = list(ckpt.shapes)  # one file: safetensors lists its names sorted
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        first.setdefault(name, i)
    placed = {p.name: min(first[s] for s in p.sources) for p in params}
    # several MLC parameters can share a first source only through fusions that never share; stable sort
    return sorted(params, key=lambda p: placed[p.name])


def _tensors(ckpt: Checkpoint, ordered: list[Param], spec: QuantSpec) -> Iterator[tuple[str, np.ndarray]]:
    dt = spec.np_model_dtype
    for p in ordered:
        parts = [ckpt.load(s) for s in p.sources]
        value = (parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)).astype(dt)
        if is_quantised(p, spec):
            q_weight, q_scale = quantize_group(value, spec)
            qw, qs = quantised_names(p.name)
            yield qw, q_weight
            yield qs, q_scale
        else:
            yield p.name, value


def convert(model_dir: str | Path, out_dir: str | Path, quant: str, *, encoding: str | None = None,
            model_config: dict | None = None) -> dict:
    """Write ``out_dir/params_shard_*.bin`` and ``tensor-cache.json`` for ``quant``; return a summary.

    ``model_config``: the family's block (default: derived from config.json); only its shapes matter here.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    spec = quant_spec(quant)
    hf_config = read_config(model_dir)
    family: Family = family_for(hf_config)
    cfg = model_config or family.model_config(hf_config)
    ckpt = Checkpoint(model_dir)
    params, skipped = plan(family, cfg, ckpt.shapes, where=str(model_dir))
    ordered = loading_order(ckpt, params)
    encoding = encoding or ENCODING_DEFAULT[spec.model_dtype]
    # mlc-llm counts every checkpoint tensor except those its mapping marks unused (rotary buffers)
    total_params = sum(int(np.prod(s)) for n, s in ckpt.shapes.items() if not n.endswith(IGNORED_SUFFIXES))
    stats = {"count": 0, "bytes": 0.0}

    def counted() -> Iterator[tuple[str, np.ndarray]]:
        for name, arr in _tensors(ckpt, ordered, spec):
            stats["count"] += 1
            stats["bytes"] += arr.size * arr.dtype.itemsize
            yield name, arr

    def metadata() -> dict:
        return {"ParamSize": stats["count"], "ParamBytes": stats["bytes"],
                "BitsPerParam": stats["bytes"] * 8.0 / total_params}

    index = write_tensor_cache(counted(), out_dir, metadata=metadata, encoding=encoding)
    recs = records(index)
    expected = {n: (list(s), d) for n, s, d in mlc_param_specs(params, spec)}
    got = {r["name"]: (r["shape"], r["dtype"]) for r in recs}
    if got != expected:  # a bug here, not a user error: the writer and the spec table disagree
        raise RuntimeError(f"MLC records differ from the expected parameter table: {sorted(set(got) ^ set(expected))}")
    files = [INDEX_FILE] + [s["dataPath"] for s in index["records"]]
    if (out_dir / "tensor-cache-b16.json").exists():
        files.append("tensor-cache-b16.json")
    return {
        "quant": spec.name,
        "model_type": family.name,
        "model_config": cfg,
        "encoding": encoding,
        "param_count": total_params,
        "param_records": len(recs),
        "param_bytes": int(stats["bytes"]),
        "bits_per_param": index["metadata"]["BitsPerParam"],
        "bytes": sum((out_dir / f).stat().st_size for f in files),  # on disk, index included
        "files": files,
        "skipped": skipped,
        "records": recs,
    }
