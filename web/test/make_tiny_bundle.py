"""Write a tiny browser bundle for the web tests: page + vendored runtime + two tiny models + fixture.

    python web/test/make_tiny_bundle.py OUT_DIR

A tiny random Llama (ChatML tokenizer, as tests/conftest.py builds them) is exported with the
project's ONNX exporter as the models of ``MODELS``: ``graph: standard`` (standard ONNX ops),
``graph: fused`` (com.microsoft contrib ops) in fp32, and fused int4 (MatMulNBits). Each is laid
out the way transformers.js v3 reads a local model:

    models/<id>/config.json            + transformers.js_config.use_external_data_format
    models/<id>/generation_config.json
    models/<id>/tokenizer.json, tokenizer_config.json (chat_template inside)
    models/<id>/onnx/model<suffix>.onnx       (suffix from the dtype: fp32 "", q4 "_q4", ...)
    models/<id>/onnx/model<suffix>.onnx_data  (transformers.js fetches "<onnx file>_data")

``fixture.json`` holds what the browser must reproduce, computed here with the Hugging Face
tokenizer and the project's onnxruntime runtime: token ids of fixed strings and chats, and the
greedy continuation and last-position logits of fixed prompts. This file doubles as the reference
for the Python bundle writer: it copies exactly the files listed in web/vendor-files.json.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

WEB = Path(__file__).resolve().parent.parent
REPO = WEB.parent
sys.path.insert(0, str(REPO))

STRINGS = ["Write Feb 8 2008 as YYYY-MM-DD.", "ISO date for: 31 August 1958", "  two  spaces\tand a tab\n",
           "héllo wörld, ünïcode ✓ 日本", "<|im_start|>user\nhi<|im_end|>", ""]
CHATS = [[{"role": "user", "content": "ISO date for: 1966/11/21"}],
         [{"role": "system", "content": "You convert dates."}, {"role": "user", "content": "Write June 3rd 1965"},
          {"role": "assistant", "content": "1965-06-03"}, {"role": "user", "content": "and 29th of May, 1960?"}]]
GREEDY_TOKENS = 24
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
# model id -> (ONNX export config, transformers.js dtype). int4: lm_head int4 because onnxruntime-web 1.22's
# MatMulNBits refuses bits=8 (`tiny-llama-int8head`, kept to pin that fact); accuracy_level 0 because
# native onnxruntime's level 4 (int8 activations) has no wasm/WebGPU counterpart and drifts from it.
MODELS = {
    "tiny-llama": ({"graph": "standard"}, "fp32"),
    "tiny-llama-fused": ({"graph": "fused"}, "fp32"),
    "tiny-llama-q4": ({"graph": "fused", "precision": "int4", "lm_head": "int4", "accuracy_level": 0}, "q4"),
    "tiny-llama-int8head": ({"graph": "fused", "precision": "int4", "lm_head": "int8"}, "q4"),
}
# transformers.js v3: dtype -> suffix of the ONNX file name (DEFAULT_DTYPE_SUFFIX_MAPPING)
DTYPE_SUFFIX = {"fp32": "", "fp16": "_fp16", "int8": "_int8", "uint8": "_uint8", "q8": "_quantized", "q4": "_q4",
                "q4f16": "_q4f16", "bnb4": "_bnb4"}


def build_hf_dir(out: Path):
    from tests.conftest import build_tiny_llama, build_tokenizer
    from toolchain.models import patch_config, save_tokenizer

    rows = [json.loads(line) for line in (REPO / "examples/data/dates.jsonl").read_text().splitlines() if line]
    tok = build_tokenizer(out, [m["content"] for r in rows for m in r["messages"]])
    build_tiny_llama(out, tok, tie=False)
    spread_weights(out)
    save_tokenizer(tok, out)  # class name transformers.js reads, chat template inside tokenizer_config.json
    patch_config(out)
    return tok


def spread_weights(hf_dir: Path, seed: int = 1) -> None:
    """Re-draw the weights at unit scale. At the default init (std 0.02) a tiny model just repeats
    its last input token, so a broken KV cache or mask would still match greedy output; with
    unit-variance layers the continuation depends on the whole context."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:  # embeddings: std 1; linears: std 1/sqrt(fan_in), variance preserving
                std = 1.0 if "embed_tokens" in name else p.shape[1] ** -0.5
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    model.save_pretrained(hf_dir)


def lay_out_model(export_dir: Path, dest: Path, dtype: str = "fp32") -> None:
    import onnx

    (dest / "onnx").mkdir(parents=True)
    for name in MODEL_FILES:
        shutil.copy2(export_dir / name, dest / name)
    name = f"model{DTYPE_SUFFIX[dtype]}.onnx"
    # transformers.js fetches "<name>_data" and mounts it under that name for onnxruntime-web, so the
    # location each initializer records must be renamed too
    model = onnx.load(str(export_dir / "model.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = f"{name}_data"
    onnx.save(model, str(dest / "onnx" / name))
    shutil.copy2(export_dir / "model.onnx_data", dest / "onnx" / f"{name}_data")
    config = json.loads((dest / "config.json").read_text())
    # without use_external_data_format transformers.js never fetches the _data file and session creation fails
    config["transformers.js_config"] = {"use_external_data_format": {name: 1}}
    if "f16" in dtype:  # the empty first cache must match the graph's float16 past inputs
        config["transformers.js_config"]["kv_cache_dtype"] = {dtype: "float16"}
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def copy_runtime(out: Path) -> None:
    shutil.copytree(WEB / "page", out, dirs_exist_ok=True)
    vendor = json.loads((WEB / "vendor-files.json").read_text())
    sources = {"transformers": WEB / "node_modules/@huggingface/transformers/dist",
               "ort": WEB / "node_modules/onnxruntime-web/dist"}
    for key, names in vendor.items():
        for name in names:
            src = sources[key] / name
            if not src.is_file():
                raise SystemExit(f"{src} missing: run `npm ci` in {WEB}")
            (out / "vendor" / key).mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, out / "vendor" / key / name)


def main(out: Path) -> None:
    from exporters.onnx import export
    from runtimes.onnxruntime_runtime import OnnxRuntime

    if out.exists():
        shutil.rmtree(out)
    with tempfile.TemporaryDirectory() as tmp:
        hf = Path(tmp) / "hf"
        tok = build_hf_dir(hf)
        fixture = {
            "strings": [{"text": s, "ids": tok.encode(s, add_special_tokens=False)} for s in STRINGS],
            "chats": [{"messages": m, "ids": list(tok.apply_chat_template(m, add_generation_prompt=True,
                                                                            tokenize=True, return_dict=False))}
                      for m in CHATS],
            "eos_token_id": tok.eos_token_id,
            "models": {},
        }
        prompts = [fixture["chats"][0]["ids"], fixture["strings"][0]["ids"]]
        for model_id, (cfg, dtype) in MODELS.items():
            exported = Path(tmp) / model_id
            export(hf, exported, {**cfg, "genai": False})
            lay_out_model(exported, out / "models" / model_id, dtype)
            runtime = OnnxRuntime(exported, threads=1)
            fixture["models"][model_id] = {
                "export": cfg,
                "dtype": dtype,
                "greedy": [{"ids": p, "new_tokens": GREEDY_TOKENS, "expected": runtime.generate(p, GREEDY_TOKENS)}
                           for p in prompts],
                "last_logits": [float(x) for x in runtime.logits(prompts[0])[-1]],
            }
    copy_runtime(out)
    bundle = {"model_id": "tiny-llama", "dtypes": {"wasm": "fp32", "webgpu": "fp32"}, "max_new_tokens": 32}
    (out / "bundle.json").write_text(json.dumps(bundle, indent=2) + "\n")
    (out / "fixture.json").write_text(json.dumps(fixture) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]).resolve())
