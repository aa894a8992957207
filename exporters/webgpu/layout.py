"""The model folder transformers.js v3 reads from a local path (``env.localModelPath``).

    models/<id>/config.json                 + "transformers.js_config" (external data, KV cache dtype)
    models/<id>/generation_config.json      eos_token_id: every id that ends a reply
    models/<id>/tokenizer.json
    models/<id>/tokenizer_config.json       with "chat_template" inside (transformers.js reads it there)
    models/<id>/onnx/model{suffix}.onnx     one per dtype (suffixes: config.DTYPES)
    models/<id>/onnx/model{suffix}.onnx_data[_1 ...]   external data when large

Facts (transformers.js 3.8.1, read in its ``models.js``): the external data files of
``model_q4.onnx`` are fetched only when ``config.json``'s ``transformers.js_config.
use_external_data_format`` names the file (value = number of chunks), as ``model_q4.onnx_data``,
``model_q4.onnx_data_1``, ...; each is handed to onnxruntime-web under that name, so the
``location`` recorded in the graph must be that name. The first KV cache is created in
``kv_cache_dtype`` (float32 unless configured), which must match a float16 graph's past inputs.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx

from .config import CHUNK_BYTES, DTYPES, EXTERNAL_DATA_AUTO_BYTES

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
MODEL_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)
ALIGN = 64  # tensor offsets inside a data file (onnxruntime reads any offset; aligned is tidier for mmap)


def onnx_name(dtype: str) -> str:
    return f"model{DTYPES[dtype].suffix}.onnx"


def _tensor_bytes(export_dir: Path, tensor: onnx.TensorProto) -> bytes:
    info = {e.key: e.value for e in tensor.external_data}
    offset, length = int(info.get("offset", 0)), int(info["length"])
    with open(export_dir / info["location"], "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise ValueError(f"{export_dir / info['location']}: tensor {tensor.name!r} needs bytes "
                         f"{offset}..{offset + length}, the file is shorter (a truncated export)")
    return data


def place_onnx(export_dir: Path, onnx_dir: Path, dtype: str, external: bool | str) -> dict:
    """Copy ``export_dir/model.onnx`` (+ its external data) to ``onnx_dir/model{suffix}.onnx``
    with the external data renamed (and chunked) the way transformers.js fetches it, or inlined.

    Returns ``{"file", "chunks", "bytes"}`` (chunks: the number of external data files, 0 when inline).
    """
    name = onnx_name(dtype)
    model = onnx.load(str(export_dir / "model.onnx"), load_external_data=False)
    external_tensors = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    total = sum(int({e.key: e.value for e in t.external_data}["length"]) for t in external_tensors)
    if external == "auto":
        external = total > EXTERNAL_DATA_AUTO_BYTES
    onnx_dir.mkdir(parents=True, exist_ok=True)
    chunks = 0
    if not external:
        for t in external_tensors:
            t.raw_data = _tensor_bytes(export_dir, t)
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
    else:
        out, size = None, 0
        try:
            for t in external_tensors:
                data = _tensor_bytes(export_dir, t)
                if out is None or (size and size + len(data) > CHUNK_BYTES):
                    if out:
                        out.close()
                    location = f"{name}_data" + (f"_{chunks}" if chunks else "")
                    out, size, chunks = open(onnx_dir / location, "wb"), 0, chunks + 1
                pad = -size % ALIGN
                out.write(b"\0" * pad)
                size += pad
                del t.external_data[:]
                for key, value in (("location", location), ("offset", str(size)), ("length", str(len(data)))):
                    entry = t.external_data.add()
                    entry.key, entry.value = key, value
                out.write(data)
                size += len(data)
        finally:
            if out:
                out.close()
    onnx.save(model, str(onnx_dir / name))
    written = (onnx_dir / name).stat().st_size + sum(
        (onnx_dir / (f"{name}_data" + (f"_{i}" if i else ""))).stat().st_size for i in range(chunks))
    return {"file": name, "chunks": chunks, "bytes": written}


def eos_ids(model_dir: Path) -> list[int]:
    """Every id that ends a reply: generation_config's, config's, and the tokenizer's eos_token
    (a chat model's end of turn, which a base model's config often lacks)."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            ids += [value] if isinstance(value, int) else list(value or [])
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    eos = tok_cfg.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if eos:
        vocab = json.loads((model_dir / "tokenizer.json").read_text())
        added = {t["content"]: t["id"] for t in vocab.get("added_tokens", [])}
        tid = added.get(eos, vocab.get("model", {}).get("vocab", {}).get(eos) if isinstance(
            vocab.get("model", {}).get("vocab"), dict) else None)
        if tid is not None:
            ids.append(int(tid))
    return list(dict.fromkeys(int(i) for i in ids))


def write_model_files(model_dir: Path, dest: Path, placed: dict[str, dict]) -> dict:
    """config.json (with transformers.js_config), generation_config.json (full eos list) and the
    tokenizer files, from the merged model's folder. The chat template goes inside
    tokenizer_config.json: transformers.js 3 does not read chat_template.jinja."""
    dest.mkdir(parents=True, exist_ok=True)
    missing = [n for n in ("config.json", *TOKENIZER_FILES) if not (model_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{model_dir} has no {', '.join(missing)}: a browser bundle needs the model's config "
                                f"and tokenizer (fix: export from a model folder saved with its tokenizer)")
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    if not tok_cfg.get("chat_template") and (model_dir / "chat_template.jinja").is_file():
        tok_cfg["chat_template"] = (model_dir / "chat_template.jinja").read_text()
    shutil.copy2(model_dir / "tokenizer.json", dest / "tokenizer.json")
    (dest / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")

    eos = eos_ids(model_dir)
    gen = json.loads((model_dir / "generation_config.json").read_text()) \
        if (model_dir / "generation_config.json").is_file() else {}
    gen["eos_token_id"] = eos if len(eos) != 1 else eos[0]
    (dest / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")

    config = json.loads((model_dir / "config.json").read_text())
    js = {"use_external_data_format": {p["file"]: p["chunks"] for p in placed.values() if p["chunks"]}}
    f16 = [d for d in placed if DTYPES[d].shader_f16]
    if f16:  # the empty first cache must match the graph's float16 past inputs
        js["kv_cache_dtype"] = {d: "float16" for d in f16}
    config["transformers.js_config"] = js
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"eos_token_id": eos, "chat_template": bool(tok_cfg.get("chat_template"))}
