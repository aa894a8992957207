"""An onnxruntime-genai model folder from an ONNX export (what a mobile app's ``og.Model`` loads).

The folder is the decoder graph, its external data, the tokenizer files and ``genai_config.json``.
Everything in that config is derived: input/output names, layers and KV type from the graph (read
without weights); geometry from config.json (checked against the graph's static dims); bos/eos/pad
from generation_config.json, then config.json, then the tokenizer. Choices (onnxruntime-genai 0.18):

- ``model.type``: the HF ``model_type`` when genai runs it as a plain decoder LLM, else "decoder".
- ``search.past_present_share_buffer`` only for com.microsoft GroupQueryAttention graphs, which write
  new KV rows into a cache preallocated to ``max_length``; a plain-ops graph concatenates (present
  is longer than past), so sharing the buffer would corrupt it.
- ``eos_token_id`` is a list: the configured EOS plus the tokenizer's ``eos_token`` (a chat
  model's end of turn; a missing one is the classic "never stops" after export).
- ``search`` is greedy with ``max_length`` = context length (default ``max_position_embeddings``,
  the rows of the graph's rotary tables; more is refused); generation_config.json's sampling values
  ride along for apps that turn sampling on. Threads are the app's choice
  (``session_options.intra_op_num_threads``, or ``og.Config.overlay``), so none are written.

Where: in place by default: an export folder already holds every file genai needs, so one small
``genai_config.json`` makes it a genai folder without duplicating weights (other readers ignore
it). A finished artifact (with ``manifest.json``) is never changed in place, its hashes would go
stale: call this inside the export stage before the manifest is written, or pass ``out_dir`` for a
separate self-contained folder, built in a temporary folder beside it (weights hard-linked when on
the same filesystem, artifacts being immutable, else copied), checked, then renamed into place.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import onnx
from onnx import TensorProto

from toolchain.core.errors import PreflightError, Problem
from toolchain.core.files import write_text_atomic
from toolchain.core.prompts import CHECK_CONVERSATIONS, CHECK_STRINGS

GENAI_CONFIG, MODEL_FILE = "genai_config.json", "model.onnx"
# copied into a separate genai folder when present (the first three are required)
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json",
              "special_tokens_map.json", "chat_template.jinja")
REQUIRED_SIDE_FILES = SIDE_FILES[:3]
PAST, PRESENT = re.compile(r"past_key_values\.(\d+)\.(key|value)$"), re.compile(r"present\.(\d+)\.(key|value)$")
INPUTS = ("input_ids", "attention_mask", "position_ids")  # genai's config keys equal the graph's names
CACHE_NAMES = {"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value",
               "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}
GQA_OP = ("com.microsoft", "GroupQueryAttention")
KV_TYPES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16"}
# ModelType::IsLLM in onnxruntime-genai 0.18: types run by its plain decoder-only model class
GENAI_LLM_TYPES = frozenset({"chatglm", "decoder", "ernie4_5", "gemma", "gemma2", "gemma3_text", "gpt2", "gptoss",
                             "granite", "internlm2", "lfm2", "llama", "mistral", "nemotron", "olmo", "phi",
                             "phimoe", "phi3", "phi3small", "qwen2", "qwen3", "smollm3"})
# provider -> its session_options.provider_options entry (CPU is the implicit fallback, never listed)
PROVIDERS = {"cpu": None, "cuda": "cuda", "dml": "dml", "webgpu": "webgpu"}
# sampling values carried from generation_config.json, with transformers' defaults
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}


def _refuse(where: str, rule: str, value, fix: str) -> PreflightError:
    return PreflightError(str(Problem(where, rule, value, fix)))


def _read_json(path: Path, required: bool = True) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    if required:
        raise _refuse(str(path), "is required for a genai folder", "missing",
                      "export with exporters.onnx.export, which writes or copies it")
    return {}


def _graph_tensors(graph: onnx.GraphProto):
    """Every tensor of a graph (initializers and node attributes, subgraphs included)."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            yield from ([attr.t] if attr.HasField("t") else []) + list(attr.tensors)
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _graph_tensors(sub)


def _dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]


def _layers(names, pattern: re.Pattern, where: str) -> int:
    """The layer count of ``<prefix>.{i}.key|value`` names, checked to be 0..n-1 for both."""
    found = {(int(m[1]), m[2]) for n in names if (m := pattern.match(n))}
    n = len({i for i, _ in found})
    if not n or found != {(i, kind) for i in range(n) for kind in ("key", "value")}:
        raise _refuse(where, f"must hold a key and a value for each layer 0..n-1 named {pattern.pattern!r} "
                      f"(a decoder with a KV cache)", sorted(found), "re-export with exporters.onnx.export")
    return n


def read_graph(model_path: Path) -> dict:
    """The graph's contract: input names, layer count, KV type and layout, GQA use, data files."""
    graph, where = onnx.load(str(model_path), load_external_data=False).graph, str(model_path)
    inputs, outputs = {v.name: v for v in graph.input}, {v.name: v for v in graph.output}
    unknown = sorted(n for n in inputs if n not in INPUTS and not PAST.match(n))
    if unknown or "input_ids" not in inputs or "logits" not in outputs:
        raise _refuse(where, "inputs must be input_ids, attention_mask, optional position_ids and "
                      "past_key_values.{i}.key|value, with a `logits` output (what genai feeds and reads)",
                      {"inputs": list(inputs), "outputs": list(outputs)}, "re-export with exporters.onnx.export")
    layers = _layers(inputs, PAST, f"{where}: inputs")
    if _layers(outputs, PRESENT, f"{where}: outputs") != layers:
        raise _refuse(f"{where}: outputs", f"present.{{i}} must match the {layers} past_key_values layers",
                      sorted(outputs), "re-export with exporters.onnx.export")
    past = inputs["past_key_values.0.key"]
    kv_type = past.type.tensor_type.elem_type
    if kv_type not in KV_TYPES:
        raise _refuse(f"{where}: past_key_values.0.key", f"element type must be one of {sorted(KV_TYPES.values())}",
                      TensorProto.DataType.Name(kv_type), "export in fp32 or fp16")
    _, kv_heads, _, head_dim = (_dims(past) + [None] * 4)[:4]
    static = lambda v: v if isinstance(v, int) else None  # noqa: E731
    return {"inputs": [n for n in INPUTS if n in inputs], "layers": layers, "kv_dtype": KV_TYPES[kv_type],
            "kv_heads": static(kv_heads), "head_dim": static(head_dim), "vocab": static(_dims(outputs["logits"])[-1]),
            "uses_gqa": any((n.domain, n.op_type) == GQA_OP for n in graph.node),
            "data_files": sorted({e.value for t in _graph_tensors(graph) if t.data_location == TensorProto.EXTERNAL
                                  for e in t.external_data if e.key == "location"})}


def _token_id(tokenizer: dict, token) -> int | None:
    """The id of a tokenizer_config.json token entry (a string or ``{"content": ...}``)."""
    content = token.get("content") if isinstance(token, dict) else token
    for added in tokenizer.get("added_tokens", []):
        if content is not None and added.get("content") == content:
            return int(added["id"])
    vocab = tokenizer.get("model", {}).get("vocab")
    return vocab.get(content) if isinstance(vocab, dict) and isinstance(content, str) else None


def _special_ids(onnx_dir: Path, hf: dict, gen: dict, vocab: int) -> dict:
    tok_cfg, tokenizer = _read_json(onnx_dir / "tokenizer_config.json"), _read_json(onnx_dir / "tokenizer.json")

    def pick(key):
        return next((src[key] for src in (gen, hf) if src.get(key) is not None), None)

    eos = pick("eos_token_id")
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    turn_end = _token_id(tokenizer, tok_cfg.get("eos_token"))
    if turn_end is not None and turn_end not in eos:
        eos.append(turn_end)
    if not eos:
        raise _refuse(f"{onnx_dir}/generation_config.json", "`eos_token_id` must be set here, in config.json or "
                      "as tokenizer_config.json `eos_token`", None, "set eos_token_id before exporting")
    pad = pick("pad_token_id")
    pad = pad if pad is not None else _token_id(tokenizer, tok_cfg.get("pad_token"))
    ids = {"bos_token_id": pick("bos_token_id"), "eos_token_id": eos, "pad_token_id": eos[0] if pad is None else pad}
    for key, value in ids.items():
        for v in value if isinstance(value, list) else [value]:
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < vocab):
                raise _refuse(f"{onnx_dir}/generation_config.json or config.json", f"`{key}` must be a token id "
                              f"below vocab_size {vocab}", v, "fix the id in the model's configs")
    return {k: v for k, v in ids.items() if v is not None}


def build_genai_config(onnx_dir: str | Path, *, context_length: int | None = None, provider: str = "cpu",
                       model_file: str = MODEL_FILE) -> tuple[dict, dict]:
    """``(genai_config, graph contract)`` for the export in ``onnx_dir``; nothing is written."""
    onnx_dir = Path(onnx_dir)
    if not (onnx_dir / model_file).is_file():
        raise _refuse(str(onnx_dir / model_file), "must exist", "missing", "pass an ONNX export folder")
    if provider not in PROVIDERS:
        raise _refuse("write_genai_folder(provider=...)", f"must be one of {sorted(PROVIDERS)}", provider,
                      "use 'cpu' for Android/iOS CPU")
    graph = read_graph(onnx_dir / model_file)
    hf, gen = _read_json(onnx_dir / "config.json"), _read_json(onnx_dir / "generation_config.json", required=False)
    if isinstance(hf.get("text_config"), dict):  # a multimodal checkpoint: the graph is its text model
        hf = {**hf, **hf["text_config"]}
    heads = hf.get("num_attention_heads")
    geometry = {k: hf.get(k) for k in ("num_attention_heads", "hidden_size", "num_hidden_layers", "vocab_size",
                                       "max_position_embeddings")}
    geometry["num_key_value_heads"] = hf.get("num_key_value_heads", heads)
    for key, value in geometry.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise _refuse(f"{onnx_dir}/config.json", f"`{key}` must be a positive integer", value, "fix config.json")
    head_size = hf.get("head_dim") or geometry["hidden_size"] // heads
    for key, ours, in_graph in (("num_hidden_layers", geometry["num_hidden_layers"], graph["layers"]),
                                ("num_key_value_heads", geometry["num_key_value_heads"], graph["kv_heads"]),
                                ("head_dim", head_size, graph["head_dim"]),
                                ("vocab_size", geometry["vocab_size"], graph["vocab"])):
        if in_graph is not None and in_graph != ours:
            raise _refuse(f"{onnx_dir}/config.json", f"`{key}` must match the graph ({in_graph})", ours,
                          "keep config.json with the graph it was exported with")
    limit = geometry["max_position_embeddings"]
    ctx = limit if context_length is None else context_length
    if isinstance(ctx, bool) or not isinstance(ctx, int) or not 0 < ctx <= limit:
        raise _refuse("write_genai_folder(context_length=...)", f"must be an integer from 1 to "
                      f"max_position_embeddings ({limit}, the rows of the graph's rotary tables)", ctx,
                      "pass a context_length in that range, or leave it unset")
    session_options = {"log_id": "onnxruntime-genai",
                       "provider_options": [{PROVIDERS[provider]: {}}] if PROVIDERS[provider] else []}
    decoder = {
        "filename": model_file, "session_options": session_options, "head_size": int(head_size),
        "hidden_size": geometry["hidden_size"], "num_attention_heads": heads, "num_hidden_layers": graph["layers"],
        "num_key_value_heads": geometry["num_key_value_heads"],
        "inputs": {**{n: n for n in graph["inputs"]}, **{k: v for k, v in CACHE_NAMES.items() if "past" in k}},
        "outputs": {"logits": "logits", **{k: v for k, v in CACHE_NAMES.items() if "present" in k}},
    }
    model_type = hf.get("model_type")
    model = {"type": model_type if model_type in GENAI_LLM_TYPES else "decoder", "context_length": ctx,
             "vocab_size": geometry["vocab_size"], "decoder": decoder,
             **_special_ids(onnx_dir, hf, gen, geometry["vocab_size"])}
    search = {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": ctx, "min_length": 0,
              "early_stopping": True, "length_penalty": 1.0, "diversity_penalty": 0.0, "no_repeat_ngram_size": 0,
              "past_present_share_buffer": graph["uses_gqa"],
              **{k: gen[k] if gen.get(k) is not None else v for k, v in SAMPLING_DEFAULTS.items()}}
    return {"model": model, "search": search}, graph


def check_genai_tokenizer(folder: str | Path, strings: Sequence[str] | None = None,
                          conversations: Sequence[list[dict]] | None = None) -> list[dict]:
    """Mismatches between onnxruntime-genai's tokenizer and transformers' for ``folder``.

    Each string is encoded by both (each with its default special-token handling, as an app and
    ``tokenizer(text)`` do), and the ids decoded back by both (special tokens skipped). Each
    conversation is rendered by both chat-template engines (genai has its own Jinja), and the
    rendered prompt joins the strings. An empty list means they agree.
    """
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    hf, ours = AutoTokenizer.from_pretrained(str(folder)), og.Tokenizer(str(folder))
    strings, mismatches = list(CHECK_STRINGS if strings is None else strings), []

    def differ(kind, text, want, got):
        first = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
        mismatches.append({"kind": kind, "text": text[:200], "hf": want, "genai": got, "first_difference": first})

    for messages in (CHECK_CONVERSATIONS if conversations is None else conversations) if hf.chat_template else ():
        try:
            want = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception:  # noqa: BLE001 - the template refuses this conversation (e.g. a system role)
            continue
        try:
            got = ours.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - an app would hit the same error
            got = f"error: {e}"
        if got != want:
            differ("chat_template", json.dumps(messages), want, got)
        strings.append(want)
    for text in strings:
        want, got = list(hf(text)["input_ids"]), [int(i) for i in ours.encode(text)]
        if got != want:
            differ("encode", text, want, got)
        if (got_text := ours.decode(want)) != (want_text := hf.decode(want, skip_special_tokens=True)):
            differ("decode", text, want_text, got_text)
    return mismatches


def _tokenizer_check(folder: Path, enabled: bool) -> dict:
    if not enabled:
        return {"ran": False, "reason": "check_tokenizer=False"}
    try:
        import onnxruntime_genai as og
    except ImportError:
        return {"ran": False, "reason": "onnxruntime-genai is not installed (pip install 'edgesmith[onnx]')"}
    try:
        mismatches = check_genai_tokenizer(folder)
    except Exception as e:  # noqa: BLE001 - a tokenizer genai cannot load is the finding, reported as such
        mismatches = [{"kind": "load", "text": "", "hf": None, "genai": f"error: {e}", "first_difference": 0}]
    return {"ran": True, "onnxruntime_genai": og.__version__, "strings": len(CHECK_STRINGS),
            "conversations": len(CHECK_CONVERSATIONS), "mismatches": mismatches, "ok": not mismatches}


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename the finished ``tmp`` to ``out_dir``, replacing only a previous genai folder."""
    if out_dir.exists():
        if not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / GENAI_CONFIG).is_file()):
            raise _refuse(str(out_dir), "must be empty or a previous genai folder to be replaced", "other files",
                          "pass a new out_dir")
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "folder")
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def write_genai_folder(onnx_dir: str | Path, out_dir: str | Path | None = None, *, context_length: int | None = None,
                       provider: str = "cpu", check_tokenizer: bool = True) -> dict:
    """Make ``out_dir`` (default: ``onnx_dir`` itself) an onnxruntime-genai folder; return its manifest:
    files, a summary of genai_config.json, and the tokenizer check (run before a separate folder is
    published; ``ok`` false lists each mismatch)."""
    onnx_dir = Path(onnx_dir)
    config, graph = build_genai_config(onnx_dir, context_length=context_length, provider=provider)
    for name in (*REQUIRED_SIDE_FILES, *graph["data_files"]):
        if not (onnx_dir / name).is_file():
            raise _refuse(str(onnx_dir / name), "is required for a self-contained genai folder", "missing",
                          "re-export; the exporter writes the weights and copies the tokenizer files")
    text = json.dumps(config, indent=2) + "\n"
    in_place = out_dir is None or Path(out_dir).resolve() == onnx_dir.resolve()
    if in_place:
        folder = onnx_dir
        if (folder / "manifest.json").is_file():
            raise _refuse(str(folder / "manifest.json"), "a finished artifact must not change after its manifest "
                          "is written", "an in-place genai write", "pass out_dir, or call write_genai_folder "
                          "inside the export stage before its manifest is written")
        write_text_atomic(folder / GENAI_CONFIG, text)
        files = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        check = _tokenizer_check(folder, check_tokenizer)
    else:
        folder = Path(out_dir)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.genai-", dir=folder.parent))
        try:
            os.chmod(tmp, 0o755)  # mkdtemp's 0700 would survive the rename
            files = [MODEL_FILE, *graph["data_files"], *(n for n in SIDE_FILES if (onnx_dir / n).is_file())]
            for name in files:
                try:
                    os.link(onnx_dir / name, tmp / name)
                except OSError:  # another filesystem, or links not allowed
                    shutil.copy2(onnx_dir / name, tmp / name)
            (tmp / GENAI_CONFIG).write_text(text)
            files = sorted([*files, GENAI_CONFIG])
            check = _tokenizer_check(tmp, check_tokenizer)
            _publish(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    model, decoder, search = config["model"], config["model"]["decoder"], config["search"]
    summary = {k: model.get(k) for k in ("type", "context_length", "bos_token_id", "eos_token_id", "pad_token_id")}
    summary.update(provider=provider, inputs=decoder["inputs"], outputs=decoder["outputs"],
                   num_hidden_layers=decoder["num_hidden_layers"], kv_dtype=graph["kv_dtype"],
                   uses_group_query_attention=graph["uses_gqa"],
                   past_present_share_buffer=search["past_present_share_buffer"])
    return {"format": "onnxruntime-genai", "folder": str(folder), "in_place": in_place, "files": files,
            "genai_config": summary, "tokenizer_check": check}
