"""Dense against pruned on the edge runtimes: size, speed and quality of each pruning variant, in one sitting.

    python benchmarks/prune_variants.py [--variants dense,structured,unstructured-50,2:4] [--work DIR]

Runs examples/prune.yaml by the real CLI as a user does (`edgesmith run`, then `edgesmith
prune-compare`) in a work folder, so the data, the fine-tune and its merge are computed once and
shared; only the prune section changes between variants (see toolchain/cli/prune_compare.py):
dense (none), structured (the recipe's cuts, healed), unstructured 50% and 2:4 (Wanda masks, the
same healing). Targets: llama.cpp Q4_K_M and Q8_0 and onnxruntime int4, benchmarked in this sitting
by edgesmith's own bench stages. The figures land in benchmarks/results/prune_variants.{json,md}
and in the run's own report. Goal (issue 15): a structured variant at >= 1.2x dense decode and >= 20%
smaller at the same quantisation, within +5% ΔPPL and 2 points of exact match after healing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from toolchain.report.pruning import VARIANTS_FILE, variants_markdown  # noqa: E402

GOAL = {"decode": 1.2, "smaller": 0.20, "delta_ppl": 0.05, "task_points": 0.02}


def goal_lines(doc: dict) -> list[str]:
    """The issue's goal, checked on the structured variant against dense from this sitting."""
    variants = doc["variants"]
    if "dense" not in variants or "structured" not in variants:
        return []
    dense, cut = variants["dense"], variants["structured"]
    lines = ["## Goal (issue 15), structured against dense", ""]
    for target, t in cut["targets"].items():
        d = dense["targets"].get(target) or {}
        for r in t.get("runs", []):
            dr = next((x for x in d.get("runs", []) if x.get("runtime") == r.get("runtime")), None)
            if not dr or not d.get("size_bytes"):
                continue
            speed, smaller = r["decode_tps"] / dr["decode_tps"], 1 - t["size_bytes"] / d["size_bytes"]
            ok = speed >= GOAL["decode"] and smaller >= GOAL["smaller"]
            lines.append(f"- {target} ({r['runtime']}): decode {speed:.2f}x, {100 * smaller:.1f}% smaller: "
                         f"{'met' if ok else 'missed'} (goal >= {GOAL['decode']}x and >= {100 * GOAL['smaller']:.0f}%)")
    models = cut["pruning"].get("models") or {}
    after = models.get("healed") or models.get("pruned") or {}
    dppl = after.get("delta_ppl")
    gap = (models.get("dense") or {}).get("task_metric", 0) - (after.get("task_metric") or 0)
    if isinstance(dppl, (int, float)):
        lines.append(f"- ΔPPL after healing {100 * dppl:+.1f}%: {'met' if dppl <= GOAL['delta_ppl'] else 'missed'} "
                     f"(goal <= +{100 * GOAL['delta_ppl']:.0f}%)")
    lines.append(f"- task metric {100 * gap:.1f} points below dense: {'met' if gap <= GOAL['task_points'] else 'missed'} "
                 f"(goal <= {100 * GOAL['task_points']:.0f} points)")
    return lines + [""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="dense,structured,unstructured-50,2:4")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("EDGESMITH_CACHE", Path.home() / ".cache" / "edgesmith"))
                    / "prune-variants", help="the folder the recipe is copied to and run in (kept: reruns reuse it)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--render", action="store_true", help="only rewrite the .md from the committed .json")
    args = ap.parse_args()
    if args.render:
        doc = json.loads((args.out / "prune_variants.json").read_text())
    else:
        work = args.work.resolve()
        (work / "data").mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "examples" / "prune.yaml", work / "prune.yaml")
        shutil.copy(REPO / "examples" / "data" / "dates.jsonl", work / "data" / "dates.jsonl")
        cli = [sys.executable, "-m", "toolchain.cli"]
        run = subprocess.run([*cli, "run", "prune.yaml", "--quiet"], cwd=work)
        if run.returncode not in (0, 3):  # 3: a gate failed; the comparison is still measured
            raise SystemExit(f"edgesmith run exited {run.returncode}")
        cmp = subprocess.run([*cli, "prune-compare", "prune.yaml", "--quiet", "--variants", args.variants], cwd=work)
        if cmp.returncode not in (0, 3):
            raise SystemExit(f"edgesmith prune-compare exited {cmp.returncode}")
        doc = json.loads((work / "runs" / "prune" / VARIANTS_FILE).read_text())
        doc["meta"]["recipe"] = "examples/prune.yaml"
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "prune_variants.json").write_text(json.dumps(doc, indent=1) + "\n")
    md = "\n".join(["# Pruning on the edge runtimes (issue 15)", "", variants_markdown(doc), *goal_lines(doc)])
    (args.out / "prune_variants.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
