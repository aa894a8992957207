"""The browser bundle on wasm against native onnxruntime on the same ONNX file, in one run.

    python benchmarks/browser_speed.py [--rounds 3] [--threads 2] [--out benchmarks/results]

One bundle from the embedded SmolLM2-135M-Instruct holding the dtypes compared (q8, fp32, q4).
Each round measures, for every dtype, the bundle's page in headless chromium on onnxruntime-web's
wasm backend (``runtimes.browser_runtime``: the page's own bench loop, cross-origin isolated so
wasm may use ``--threads`` threads) and native onnxruntime (CPU EP, same threads) on the very
same file; plus q8 on one wasm thread (what a page served without COOP/COEP headers gets) and q8
on onnxruntime-web's JSEP build (the WebGPU-capable wasm, which the page uses only for WebGPU). The
candidates take turns round after round; medians over rounds are reported, with the ratio of
medians and the median of per-round ratios.

Goal (issue 5): browser wasm decode >= 0.5x native onnxruntime on the same model file.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

DTYPES = ("q8", "fp32", "q4")
GOAL = 0.5


def candidates(threads: int) -> list[tuple[str, str, str, int, dict]]:
    """(label, runtime, dtype, threads, runtime options)."""
    rows = []
    for d in DTYPES:
        rows += [(f"{d} browser wasm", "browser-wasm", d, threads, {}),
                 (f"{d} native onnxruntime", "onnxruntime", d, threads, {})]
    rows += [("q8 browser wasm, 1 thread (no isolation headers)", "browser-wasm", "q8", 1, {}),
             ("q8 browser wasm, JSEP build (the WebGPU-capable wasm)", "browser-wasm", "q8", threads,
              {"wasm_build": "jsep"})]
    return rows


def measure(bundle: Path, runtime: str, dtype: str, threads: int, ids: list[int], gen: int, options: dict) -> dict:
    from runtimes.browser_runtime import BrowserWasmRuntime
    from runtimes.onnxruntime_runtime import OnnxRuntime
    from toolchain.core.benchschema import BenchSettings

    files = json.loads((bundle / "bundle.json").read_text())["files"]
    settings = BenchSettings(threads=threads, prompt_tokens=len(ids), gen_tokens=gen, repetitions=1, warmup=1)
    if runtime == "browser-wasm":
        rt = BrowserWasmRuntime(bundle, threads=threads, dtype=dtype, **options)
    else:
        rt = OnnxRuntime(bundle, threads=threads, model_file=files[dtype])
    try:
        r = rt.bench(ids, settings).to_dict()
    finally:
        if hasattr(rt, "close"):
            rt.close()
    return {"decode_tps": r["decode_tps"]["median"], "prefill_tps": r["prefill_tps"]["median"],
            "load_s": r["load_s"], "mb": r["artifact_mb"], "warnings": r["warnings"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)

    from gguf_vs_llamacpp import embedded_hf_dir
    from transformers import AutoTokenizer

    from exporters.webgpu import export
    from toolchain.core import prompts

    with tempfile.TemporaryDirectory() as tmp:
        hf = embedded_hf_dir(Path(tmp))
        bundle = Path(tmp) / "bundle"
        export(hf, bundle, {"webgpu": ["q4"], "wasm": list(DTYPES)})
        tok = AutoTokenizer.from_pretrained(hf)
        ids = list(tok.apply_chat_template(prompts.BENCH_PROMPT, add_generation_prompt=True, tokenize=True,
                                           return_dict=False))[:128]
        results: dict[str, list[dict]] = {label: [] for label, *_ in candidates(args.threads)}
        for rnd in range(args.rounds):
            for label, runtime, dtype, threads, options in candidates(args.threads):
                results[label].append(measure(bundle, runtime, dtype, threads, ids, args.gen, options))
                print(f"round {rnd + 1}/{args.rounds} {label}: decode {results[label][-1]['decode_tps']:.1f} tok/s",
                      flush=True)

    def med(label, key):
        return statistics.median(r[key] for r in results[label])

    rows, ratios = [], {}
    for label, runtime, dtype, threads, _ in candidates(args.threads):
        rows.append({"candidate": label, "dtype": dtype, "threads": threads, "mb": results[label][0]["mb"],
                     "load_s": med(label, "load_s"), "prefill_tps": med(label, "prefill_tps"),
                     "decode_tps": med(label, "decode_tps"), "rounds": results[label]})
    for d in DTYPES:
        b, n = f"{d} browser wasm", f"{d} native onnxruntime"
        per_round = [x["decode_tps"] / y["decode_tps"] for x, y in zip(results[b], results[n])]
        ratios[d] = {"decode_ratio_of_medians": med(b, "decode_tps") / med(n, "decode_tps"),
                     "decode_ratio_median_per_round": statistics.median(per_round),
                     "prefill_ratio_of_medians": med(b, "prefill_tps") / med(n, "prefill_tps")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "browser_speed.json").write_text(json.dumps({"threads": args.threads, "rounds": args.rounds,
                                                              "prompt_tokens": len(ids), "gen_tokens": args.gen,
                                                              "rows": rows, "ratios": ratios}, indent=1) + "\n")
    lines = [f"# Browser (wasm) against native onnxruntime, same file — {args.threads} threads, {len(ids)}-token "
             f"prompt, {args.gen} tokens, median of {args.rounds} rounds", "",
             "| candidate | MB | load s | prefill tok/s | decode tok/s |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['candidate']} | {r['mb']:.0f} | {r['load_s']:.1f} | {r['prefill_tps']:.0f} | {r['decode_tps']:.1f} |"
              for r in rows]
    lines += ["", f"| dtype | decode browser/native (of medians) | per-round median | prefill | goal ≥{GOAL}x |",
              "|---|---:|---:|---:|---|"]
    lines += [f"| {d} | {r['decode_ratio_of_medians']:.2f}x | {r['decode_ratio_median_per_round']:.2f}x | "
              f"{r['prefill_ratio_of_medians']:.2f}x | {'met' if r['decode_ratio_of_medians'] >= GOAL else 'missed'} |"
              for d, r in ratios.items()]
    (args.out / "browser_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
