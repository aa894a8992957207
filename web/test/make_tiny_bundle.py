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
# model id -> (ONNX export config, transformers.js dtype). int4: lm_head int4 because onnxruntime-web 1.22's
# MatMulNBits refuses bits=8 (`tiny-llama-int8head`, kept to pin that fact); accuracy_level 0 because
# native onnxruntime's level 4 (int8 activations) has no wasm/WebGPU counterpart and drifts from it.
MODELS = {
    "tiny-llama": ({"graph": "standard"}, "fp32"),
    "tiny-llama-fused": ({"graph": "fused"}, "fp32"),
    "tiny-llama-q4": ({"graph": "fused", "precision": "int4", "lm_head": "int4", "accuracy_level": 0}, "q4"),
    "tiny-llama-int8head": ({"graph": "fused", "precision": "int4", "lm_head": "int8"}, "q4"),
}


def build_hf_dir(out: Path):
    from tests.conftest import build_spread_llama

    rows = [json.loads(line) for line in (REPO / "examples/data/dates.jsonl").read_text().splitlines() if line]
    return build_spread_llama(out, [m["content"] for r in rows for m in r["messages"]])


def lay_out_model(export_dir: Path, dest: Path, dtype: str = "fp32") -> None:
    """The bundle exporter's own layout (exporters.webgpu.layout), external data forced on."""
    from exporters.webgpu.layout import place_onnx, write_model_files

    placed = {dtype: place_onnx(export_dir, dest / "onnx", dtype, external=True)}
    write_model_files(export_dir, dest, placed)


def copy_runtime(out: Path) -> None:
    from exporters.webgpu.vendor import copy_page

    copy_page(out)


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
