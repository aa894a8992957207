"""Write a merged Hugging Face model directory as one GGUF file.

Order of work: preflight (config and tokenizer only, nothing loaded), tensor plan (every name
and shape checked against the safetensors headers), then the file: header, metadata and tensor
infos first, tensor data streamed one tensor at a time, into a temporary file renamed into place
when whole.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import gguf
import numpy as np

from toolchain.core.errors import PreflightError
from toolchain.core.files import atomic_path

from . import tables as tb
from .families import (
    Checkpoint,
    Hparams,
    check_gguf_names,
    family_for,
    plan_tensors,
    read_config,
)
from .vocab import Vocab, read_vocab

CAUSAL_LM_SUFFIXES = ("ForCausalLM", "ForConditionalGeneration")


@dataclass
class Preflight:
    """What preflight found: enough to write the file without reading config or tokenizer again."""

    family: ModuleType
    hparams: Hparams
    vocab: Vocab
    out_type: str

    def summary(self) -> dict:
        return {"arch": self.hparams.arch, "model_type": self.hparams.model_type, "out_type": self.out_type,
                "pre_tokenizer": self.vocab.pre, "tokenizer_model": self.vocab.model}


def run_preflight(model_dir: str | Path, options: dict | None = None) -> Preflight:
    """Refuse, before any work, what the GGUF writer or llama.cpp cannot reproduce."""
    options = dict(options or {})
    out_type = str(options.pop("out_type", "F16")).upper()
    if options:
        raise PreflightError(f"GGUF writer options: unknown {sorted(options)} (fix: pass only out_type)")
    if out_type not in tb.OUT_TYPES:
        raise PreflightError(f"GGUF writer: `out_type` must be one of {', '.join(tb.OUT_TYPES)}, got {out_type!r} "
                             f"(fix: write F16/BF16/F32 here; quantised types come from llama.cpp's quantizer)")
    config = read_config(model_dir)
    family = family_for(config.get("model_type"))
    architectures = config.get("architectures") or []
    if architectures and not any(a.endswith(CAUSAL_LM_SUFFIXES) for a in architectures):
        raise PreflightError(f"config.json: `architectures` must name a causal language model (…ForCausalLM), "
                             f"got {architectures!r} (fix: export the generation model, not a classifier or encoder)")
    hparams = family.read_hparams(config)
    vocab = read_vocab(model_dir, hparams.vocab_size)
    return Preflight(family, hparams, vocab, out_type)


def tensor_type(name: str, ndim: int, out_type: str) -> tb.GGMLType:
    """llama.cpp keeps 1-D tensors and norm weights in F32; the rest take ``out_type``."""
    if ndim <= tb.F32_MAX_DIMS or name.endswith(tb.F32_NAME_SUFFIXES):
        return tb.GGMLType.F32
    return tb.OUT_TYPES[out_type].tensor_type


def _encode(array: np.ndarray, qtype: tb.GGMLType) -> np.ndarray:
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)


def _nbytes(shape: tuple[int, ...], qtype: tb.GGMLType) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * type_size


def write_gguf(model_dir: str | Path, out_path: str | Path, out_type: str = "F16") -> dict:
    """Write ``model_dir`` (a merged HF model saved with save_pretrained) to ``out_path`` as GGUF."""
    model_dir, out_path = Path(model_dir), Path(out_path)
    pre = run_preflight(model_dir, {"out_type": out_type})
    family, hp, vocab = pre.family, pre.hparams, pre.vocab
    ckpt = Checkpoint(model_dir)
    entries, skipped = plan_tensors(family, hp, ckpt)
    extras = family.extra_tensors(hp)
    check_gguf_names(family.ARCH, [e.gguf_name for e in entries] + [n for n, _ in extras])

    writer = gguf.GGUFWriter(path=None, arch=hp.arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(model_dir.name)
    writer.add_file_type(tb.OUT_TYPES[pre.out_type].file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    family.write_hparams(writer, hp)
    vocab.write(writer)

    plan = []  # (name, shape, type, source): the infos go into the header before any data
    for e in entries:
        qtype = tensor_type(e.gguf_name, len(e.shape), pre.out_type)
        plan.append((e.gguf_name, e.shape, qtype, e))
    for name, array in extras:
        plan.append((name, array.shape, tb.GGMLType.F32, array))
    for name, shape, qtype, _ in plan:
        writer.add_tensor_info(name, shape, np.dtype(np.float32), _nbytes(shape, qtype), raw_dtype=qtype)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp:
        try:
            _write_all(writer, tmp, plan, ckpt)
        finally:
            writer.close()

    warnings = list(hp.extra.get("warnings", [])) + list(vocab.warnings)
    counts: dict[str, int] = {}
    for _, _, qtype, _ in plan:
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    return {
        "path": str(out_path), "arch": hp.arch, "model_type": hp.model_type, "out_type": pre.out_type,
        "tensor_count": len(plan), "tensor_types": counts, "size_bytes": out_path.stat().st_size,
        "hparams": {k: v for k, v in hp.to_dict().items() if k != "warnings"},
        "pre_tokenizer": vocab.pre, "special_token_ids": dict(vocab.special_ids), "tokenizer": vocab.summary(),
        "skipped_tensors": skipped, "warnings": warnings,
    }


def _write_all(writer, path: Path, plan, ckpt) -> None:
    """Header, metadata, tensor infos, then every tensor's bytes, read and encoded one at a time."""
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, shape, qtype, source in plan:
        if isinstance(source, np.ndarray):
            array = source
        else:
            array = ckpt.load(source.hf_name)
            if source.transform is not None:
                array = source.transform(array)
        if tuple(array.shape) != tuple(shape):  # a transform bug, never user input
            raise RuntimeError(f"{name}: produced shape {array.shape}, planned {shape}")
        writer.write_tensor_data(_encode(array, qtype))
