"""Dense against pruned on the edge runtimes: size, speed and quality of each pruning variant, in one sitting.

    python benchmarks/prune_variants.py [--variants dense,structured,unstructured-50,2:4] [--out benchmarks/results]

Every variant is examples/prune.yaml run by the real CLI (`edgesmith run`) into one output folder, so
the data, the fine-tune and its merge are computed once and shared; only the prune section changes:

- ``dense``: no prune section (the merged fine-tuned model);
- ``structured``: the recipe's own cuts (6 of 30 layers, MLP 1536 -> 1280) healed by distillation;
- ``unstructured-50``: 50% of every decoder linear's weights zeroed (Wanda), the same healing;
- ``2:4``: 2 of every 4 consecutive weights of a row zeroed (Wanda), the same healing.

Targets: llama.cpp Q4_K_M and Q8_0 and onnxruntime int4 (the recipe's onnx-int4), benchmarked by
edgesmith's own bench stages (the one schema: prefill and decode tok/s as medians over repetitions).
Reported per variant and target: file size, prefill and decode tok/s, the ratios to dense measured in
this run, and the gate's KL against the variant's own reference; per variant the prune stage's figures
against the dense fine-tuned model (ΔPPL on the eval answers, KL, top-1, exact match). Goal (issue 15):
a structured variant at >= 1.2x dense decode and >= 20% smaller at the same quantisation, within +5%
ΔPPL and 2 points of exact match after healing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "dense": None,
    "structured": "recipe",
    "unstructured-50": {"sparse": {"fraction": 0.5}},
    "2:4": {"sparse": {"pattern": "2:4"}},
}
SPEED_TARGETS = ("gguf-q4_k_m", "gguf-q8_0", "onnx-int4")


def recipe_for(variant: str, work: Path, recipe: Path | None = None) -> Path:
    """The variant's recipe: next to ``recipe`` (its relative paths and its run's cache kept), or in ``work``."""
    source = recipe or REPO / "examples" / "prune.yaml"
    doc = yaml.safe_load(source.read_text())
    if recipe is None:
        doc["data"]["path"] = str(REPO / "examples" / "data" / "dates.jsonl")
    doc["output_dir"] = str(work / "runs")
    doc["targets"] = [t for t in doc["targets"] if t["name"] in SPEED_TARGETS]
    spec = VARIANTS[variant]
    if spec is None:
        doc.pop("prune")
    elif spec != "recipe":
        doc["prune"] = {"score": doc["prune"]["score"], **spec, "heal": doc["prune"]["heal"]}
    folder = recipe.parent if recipe else work
    path = folder / f"variant-{variant.replace(':', '-')}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run_variant(variant: str, work: Path, recipe: Path | None = None) -> dict:
    path = recipe_for(variant, work, recipe)
    t0 = time.perf_counter()
    # every bench stage re-measured now (--force bench), so all variants are timed in this sitting
    proc = subprocess.run([sys.executable, "-m", "toolchain.cli", "run", str(path), "--quiet", "--force", "bench"],
                          cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (work / f"{path.stem}.log").write_text(proc.stdout + proc.stderr)
    report_path = work / "runs" / "prune" / "report" / "report.json"
    if proc.returncode not in (0, 3) or not report_path.exists():
        raise SystemExit(f"{variant}: edgesmith run exited {proc.returncode}; see {work / (path.stem + '.log')}")
    report = json.loads(report_path.read_text())
    shutil.copy(report_path, work / f"{path.stem}.report.json")
    return {"exit": proc.returncode, "wall_s": wall, "report": report}


def median(stat) -> float | None:
    if isinstance(stat, dict):
        return stat.get("median", stat.get("mean"))
    return stat


def summarise(variant: str, got: dict) -> dict:
    report = got["report"]
    sizes = {t["name"]: t["size_mb"] for t in report.get("targets", [])}
    rows = {}
    for r in report.get("bench", []):
        if r.get("target") in SPEED_TARGETS:
            rows[r["target"]] = {"runtime": r["runtime"], "size_mb": sizes.get(r["target"]),
                                 "prefill_tps": median(r.get("prefill_tps")), "decode_tps": median(r.get("decode_tps")),
                                 "kl_vs_own_reference": (r.get("quality") or {}).get("kl_mean"),
                                 "gate_passed": (r.get("gate") or {}).get("passed"),
                                 "load": (r.get("machine") or {}).get("loadavg")}
    pruning = report.get("pruning") or {}
    models = pruning.get("models") or {}
    task = report.get("task") or {}
    quality = {"written": "healed" if "healed" in models else "pruned" if models else "dense"}
    for name in ("pruned", "healed"):
        if name in models:
            quality[name] = {k: models[name].get(k) for k in ("delta_ppl", "kl_mean", "top1", "task_metric")}
    quality["dense_task_metric"] = (models.get("dense") or {}).get("task_metric", task.get("after"))
    return {"exit": got["exit"], "wall_s": got["wall_s"], "targets": rows, "quality": quality,
            "parameters": ((pruning.get("structured") or {}).get("parameters") or {}).get("after"),
            "sparsity": (pruning.get("sparsity") or {}).get("overall")}


def _num(x) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) else "–"


def markdown(results: dict, meta: dict) -> str:
    lines = ["# Pruning on the edge runtimes (issue 15)", "",
             f"{meta['recipe']}, variants in one sitting on {meta['machine']}; bench {meta['bench']}. "
             "Sizes are the exported files; speeds are medians over the bench repetitions; ratios are to dense "
             "in this run. Quality is the prune stage's, against the dense fine-tuned model, on the 48 eval rows.", "",
             "| variant | target | size MB | vs dense | prefill tok/s | decode tok/s | decode vs dense | KL vs own reference |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    dense = results.get("dense", {}).get("targets", {})
    for variant, res in results.items():
        for target in SPEED_TARGETS:
            r = res["targets"].get(target)
            if not r:
                continue
            d = dense.get(target, {})
            size_ratio = r["size_mb"] / d["size_mb"] if d.get("size_mb") and r.get("size_mb") else None
            dec_ratio = r["decode_tps"] / d["decode_tps"] if d.get("decode_tps") and r.get("decode_tps") else None
            lines.append(f"| {variant} | {target} | {r['size_mb']:.1f} | {size_ratio:.2f}x | {r['prefill_tps']:.1f} | "
                         f"{r['decode_tps']:.1f} | {dec_ratio:.2f}x | {r['kl_vs_own_reference']:.3g} |"
                         if size_ratio and dec_ratio else f"| {variant} | {target} | {r.get('size_mb')} | – | "
                         f"{r.get('prefill_tps')} | {r.get('decode_tps')} | – | {r.get('kl_vs_own_reference')} |")
    lines += ["", "| variant | ΔPPL vs dense (before → after healing) | KL vs dense (after) | top-1 (after) | "
                  "exact match (dense → after) |", "|---|---|---:|---:|---|"]
    for variant, res in results.items():
        q = res["quality"]
        if "healed" not in q and "pruned" not in q:
            lines.append(f"| {variant} | – | – | – | {_num(q.get('dense_task_metric'))} |")
            continue
        before, after = q.get("pruned", {}), q.get("healed", q.get("pruned", {}))
        lines.append(f"| {variant} | {100 * before.get('delta_ppl', float('nan')):+.1f}% → "
                     f"{100 * after.get('delta_ppl', float('nan')):+.1f}% | {after.get('kl_mean', float('nan')):.3g} | "
                     f"{after.get('top1', float('nan')):.3f} | {_num(q.get('dense_task_metric'))} → {_num(after.get('task_metric'))} |")
    sparse = [v for v in results if v not in ("dense", "structured")]
    missing = [v for v in VARIANTS if v not in results]
    lines += ["", "No target edgesmith ships runs unstructured or 2:4 sparsity faster or smaller: onnxruntime, "
                  "llama.cpp and MLC store and multiply the zeros densely"
              + (" (their rows above are the same size as dense)." if sparse else ".")]
    if missing:
        lines.append(f"Not run in this sitting: {', '.join(missing)}.")
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("EDGESMITH_CACHE", Path.home() / ".cache" / "edgesmith"))
                    / "prune-variants")
    ap.add_argument("--recipe", type=Path, help="a copy of examples/prune.yaml whose run folder (--work/runs) "
                    "already holds its stages: they are reused, only the bench stages re-run")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--render", action="store_true", help="only rewrite the .md from the committed .json")
    args = ap.parse_args()
    if args.render:
        saved = json.loads((args.out / "prune_variants.json").read_text())
        (args.out / "prune_variants.md").write_text(markdown(saved["variants"], saved["meta"]))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    results = {}
    for variant in args.variants.split(","):
        print(f"== {variant}", flush=True)
        results[variant] = summarise(variant, run_variant(variant, args.work, args.recipe and args.recipe.resolve()))
        print(json.dumps(results[variant]["targets"], indent=1), flush=True)
    bench = yaml.safe_load((REPO / "examples" / "prune.yaml").read_text())["bench"]
    meta = {"recipe": "examples/prune.yaml (targets gguf-q4_k_m, gguf-q8_0, onnx-int4)",
            "machine": f"{os.cpu_count()} CPUs", "bench": bench,
            "loadavg_end": os.getloadavg(), "decode_ratio_median": None}
    dense = results.get("dense", {}).get("targets", {})
    ratios = [r["decode_tps"] / dense[t]["decode_tps"] for t, r in results.get("structured", {}).get("targets", {}).items()
              if dense.get(t, {}).get("decode_tps")]
    meta["decode_ratio_median"] = statistics.median(ratios) if ratios else None
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prune_variants.json").write_text(json.dumps({"meta": meta, "variants": results}, indent=1) + "\n")
    (args.out / "prune_variants.md").write_text(markdown(results, meta))
    print(markdown(results, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
