"""`edgesmith prune-compare RECIPE`: dense against each pruning variant on the edge runtimes, in one sitting.

    edgesmith prune-compare examples/prune.yaml [--variants dense,structured,unstructured-50,2:4] [--target NAME]

Every variant is the recipe itself with only its ``prune`` section changed, run in the recipe's own
run folder, so the data, the fine-tune, its merge and the calibration sample are computed once and
shared:

- ``dense``: no prune section (the merged fine-tuned model);
- ``structured``: the recipe's own prune section;
- ``unstructured-NN``: NN% of every decoder linear's weights zeroed (the recipe's score, its healing);
- ``2:4`` / ``4:8``: N of every M consecutive weights of a row kept (the same).

Only the targets a native runtime benchmarks are compared (GGUF on llama.cpp, ONNX on onnxruntime;
``--target`` picks others). Every variant's model and exports are made first; then every bench stage
runs again, variant after variant, for ``--rounds`` rounds (each speed is the median of its rounds),
so all speeds come from one sitting and a passing load spike moves one round, not the figure.
The figures (size on disk, prefill and decode tok/s, the gate against each variant's own
reference, and the prune stage's quality against dense) go to ``<run>/prune-variants.json``; the
recipe's own run is then finished and its report rewritten with the table.
"""
from __future__ import annotations

import copy
import os
import re
import sys
import time

from toolchain.core.errors import EdgesmithError
from toolchain.report.pruning import VARIANTS_FILE  # where the report reads the figures

DEFAULT_VARIANTS = "dense,structured,unstructured-50,2:4"
NATIVE_FORMATS = ("gguf", "onnx")


def add_prune_compare_parser(sub) -> None:
    p = sub.add_parser("prune-compare", help="dense against pruning variants: size, speed, quality, in one sitting",
                       description="Run the recipe once per pruning variant (dense, its own cuts, unstructured, "
                                   "N:M) in its run folder, benchmark each on the native runtimes in this sitting, "
                                   "and add the comparison to the run's report.")
    p.add_argument("recipe", help="a recipe with a prune section (see examples/prune.yaml)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help=f"comma-separated: dense, structured, unstructured-NN (NN%% zeroed), 2:4, 4:8 "
                        f"(default {DEFAULT_VARIANTS})")
    p.add_argument("--target", action="append", default=[],
                   help="compare this target (repeatable; default: every gguf and onnx target)")
    p.add_argument("--rounds", type=int, default=3,
                   help="benchmark every variant this many times in turn; each speed is the median of its rounds "
                        "(a busy machine slows one variant's stage, not all of them; default 3)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def variant_prune(recipe, name: str, where: str = "--variants"):
    """The prune section of variant ``name`` (None for dense), from the recipe's own."""
    from toolchain.stages.prune import PruneSection, SparseCut

    own = recipe.prune
    if name == "dense":
        return None
    if name == "structured":
        if not own.cuts():
            raise EdgesmithError(f"{where}: 'structured' needs the recipe's prune section to cut layers, mlp or heads "
                                 f"(it has only {', '.join(k for k in ('sparse',) if own.sparse) or 'nothing'}); "
                                 "drop 'structured' from --variants")
        return own
    m = re.fullmatch(r"unstructured-(\d{1,2})", name)
    if m and 0 < int(m.group(1)) < 100:
        sparse = SparseCut(fraction=int(m.group(1)) / 100)
    elif name in ("2:4", "4:8"):
        sparse = SparseCut(pattern=name)
    else:
        raise EdgesmithError(f"{where}: unknown variant {name!r}; use dense, structured, unstructured-NN "
                             "(e.g. unstructured-50 for 50% of each row zeroed), 2:4 or 4:8")
    return PruneSection(score=own.score, sparse=sparse, heal=own.heal)


def variant_recipe(recipe, name: str, targets: list[str]):
    r = copy.deepcopy(recipe)
    r.recipe_path = recipe.recipe_path
    r.prune = variant_prune(recipe, name)
    r.targets = [t for t in r.targets if t.name in targets]
    return r


def compared_targets(recipe, wanted: list[str]) -> list[str]:
    from toolchain.cli.run import pick_targets

    names = [t.name for t in recipe.targets]
    if wanted:
        picked = pick_targets(wanted, names)
        return [n for n in names if n in picked]
    out = [t.name for t in recipe.targets if t.format in NATIVE_FORMATS]
    if not out:
        raise EdgesmithError(f"{recipe.recipe_path}: targets: no gguf or onnx target to compare on; add one or name "
                             f"targets with --target (targets: {', '.join(names) or 'none'})")
    return out


def summarise(runner, steps) -> dict:
    """One variant's figures from its run's artifacts: per target size and speed, and the prune stage's."""
    from toolchain.pipeline.artifacts import Artifact
    from toolchain.quality.gates import bench_verdict

    targets: dict = {}
    pruning = {}
    for step in steps:
        art = Artifact.open(runner.store.path_for(step.stage.id, step.key)) if step.key else None
        if art is None:
            continue
        fig = art.figures
        if step.stage.kind == "export":
            targets.setdefault(step.stage.target, {})["size_bytes"] = art.size_bytes
        elif step.stage.kind == "bench":
            gate = bench_verdict(fig)
            row = targets.setdefault(step.stage.target, {})
            row.setdefault("runs", []).append({
                "runtime": fig.get("runtime"), "prefill_tps": _median(fig.get("prefill_tps")),
                "decode_tps": _median(fig.get("decode_tps")), "kl_mean": (fig.get("quality") or {}).get("kl_mean"),
                "top1": (fig.get("quality") or {}).get("top1_agreement"),
                "gate": gate["gate"] if gate else None, "gate_passed": gate["passed"] if gate else None,
                "gate_failures": gate["failures"] if gate else []})
        elif step.stage.kind == "prune":
            structured = fig.get("structured") or {}
            pruning = {"models": fig.get("models") or {}, "parameters": structured.get("parameters"),
                       "dropped_layers": structured.get("dropped_layers"),
                       "sparsity": (fig.get("sparsity") or {}).get("overall"),
                       "size_bytes": fig.get("size_bytes")}
    return {"targets": targets, "pruning": pruning}


def merge_rounds(got: list[dict]) -> dict:
    """One variant's rounds as one: each speed the median of its rounds' medians (every round's kept);
    sizes, gates and the prune figures are the same in every round (the last one's)."""
    import statistics

    out = copy.deepcopy(got[-1])
    for target, t in out["targets"].items():
        for i, run in enumerate(t.get("runs", [])):
            for key in ("prefill_tps", "decode_tps"):
                values = [g["targets"][target]["runs"][i][key] for g in got
                          if g["targets"].get(target) and g["targets"][target]["runs"][i].get(key) is not None]
                run[key] = statistics.median(values) if values else None
                run[key + "_rounds"] = values
    return out


def _median(stat):
    return stat.get("median", stat.get("mean")) if isinstance(stat, dict) else stat


def run_prune_compare(args) -> int:
    from toolchain.cli.run import gate_summary, parse_overrides
    from toolchain.core.files import write_json_atomic
    from toolchain.pipeline.plan import Context
    from toolchain.pipeline.recipe import load_recipe
    from toolchain.pipeline.runner import Runner, select

    recipe = load_recipe(args.recipe, parse_overrides(args.set))
    if getattr(recipe, "prune", None) is None:
        raise EdgesmithError(f"{recipe.recipe_path}: prune-compare needs a prune section (the variants keep its "
                             "score and heal); add one, e.g. prune: {layers: {drop: 2}, heal: {steps: 40}}")
    if args.rounds < 1:
        raise EdgesmithError(f"--rounds {args.rounds}: give at least 1")
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    for n in names:
        variant_prune(recipe, n)  # every name checked before anything runs
    targets = compared_targets(recipe, args.target)
    progress = not args.quiet and sys.stderr.isatty()
    t0 = time.perf_counter()
    runners = {name: Runner(Context(variant_recipe(recipe, name, targets), progress=progress)) for name in names}
    for name, runner in runners.items():  # first every model and export (pruning, healing: the slow part)
        print(f"== variant {name}: model and exports", flush=True)
        runner.execute(select(runner.stages, until="export"))
    t_bench = time.perf_counter()
    rounds: dict = {name: [] for name in names}
    for r in range(args.rounds):  # then every benchmark again, variant after variant, round after round
        for name, runner in runners.items():
            print(f"== variant {name}: benchmarks, round {r + 1} of {args.rounds}", flush=True)
            rounds[name].append(summarise(runner, runner.execute(select(runner.stages, until="bench"), {"bench"})))
    results = {name: merge_rounds(got) for name, got in rounds.items()}
    doc = {"meta": {"recipe": str(recipe.recipe_path), "variants": names, "targets": targets,
                    "bench": {k: getattr(recipe.bench, k) for k in ("threads", "prompt_tokens", "gen_tokens",
                                                                  "repetitions", "warmup")},
                    "rounds": args.rounds, "cpus": os.cpu_count(), "loadavg_end": list(os.getloadavg()),
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wall_s": time.perf_counter() - t0,
                    "bench_wall_s": time.perf_counter() - t_bench},
           "variants": results}
    runner = Runner(Context(recipe, progress=progress))
    write_json_atomic(runner.run_dir / VARIANTS_FILE, doc, indent=1)
    print(f"== the recipe's own run, its report with the comparison", flush=True)
    steps = runner.execute(runner.stages, {"report"})
    from toolchain.report.pruning import variants_markdown

    print(variants_markdown(doc))
    print(f"figures: {runner.run_dir / VARIANTS_FILE}\nreport: {runner.run_dir / 'report.html'}")
    return gate_summary(steps, runner)
