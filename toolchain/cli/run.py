"""`edgesmith run|train|merge|export|bench|report RECIPE` and `edgesmith targets`."""
from __future__ import annotations

import fnmatch
import os
import sys

import yaml

from toolchain.cli.exitcodes import EXIT_GATE, EXIT_OK
from toolchain.core import dist
from toolchain.core.errors import EdgesmithError


def pick_targets(patterns: list[str], names: list[str]) -> set[str]:
    """Target names ``--target`` selects: each exact name, or every name a glob (``web*``) matches."""
    picked, unknown = set(), []
    for pat in patterns:
        hits = fnmatch.filter(names, pat) if any(c in pat for c in "*?[") else [pat] if pat in names else []
        picked.update(hits)
        if not hits:
            unknown.append(pat)
    if unknown:
        raise EdgesmithError(f"--target {', '.join(unknown)} is not in the recipe (targets: {', '.join(names)}; "
                             f"a glob such as 'web*' selects several)")
    return picked


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise EdgesmithError(f"--set {item!r} must look like KEY=VALUE (e.g. train.max_steps=10)")
        out[key.strip()] = yaml.safe_load(value)
    return out


def cmd_pipeline(args, until: str | None) -> int:
    from toolchain.pipeline.plan import Context
    from toolchain.pipeline.recipe import load_recipe
    from toolchain.pipeline.runner import Runner, select

    recipe = load_recipe(args.recipe, parse_overrides(args.set))
    ctx = Context(recipe, progress=not args.quiet and sys.stderr.isatty() or os.environ.get("EDGESMITH_PROGRESS") == "1",
                  resume=args.resume)
    if not ctx.progress:  # transformers' and huggingface_hub's own bars too (read at import; workers inherit it)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    runner = Runner(ctx)
    only = None
    if getattr(args, "target", None):
        wanted = pick_targets(args.target, [t.name for t in recipe.targets])
        kind = "export" if until == "export" else "bench"
        only = [s.id for s in runner.stages if s.kind == kind and s.target in wanted]
        until = None
    stages = select(runner.stages, until=until, only=only)
    force = set(args.force)
    if not dist.is_main():  # a launcher's other rank: it trains with rank 0 and prints nothing of the run
        try:
            if not args.dry_run:
                runner.execute(stages, force)
        finally:
            dist.leave()
        return EXIT_OK
    if args.dry_run:
        print(f"plan for {recipe.name} -> {runner.run_dir}")
        for i, step in enumerate(runner.decide(stages, force), 1):
            where = f"{step.stage.id}-{step.key}" if step.key else step.stage.id
            why = f" ({step.reason})" if step.reason else ""
            print(f"  {i:2d}. {step.stage.id:<34} {step.status.upper():<7} {step.stage.summary}{why}  [{where}]")
        return 0
    try:
        steps = runner.execute(stages, force)
    finally:
        dist.leave()  # a launcher's process group, when there is one (rank 0 has left it after training)
    ran = sum(1 for s in steps if s.status == "run")
    print(f"{len(steps)} stages: {ran} ran, {len(steps) - ran} reused. Outputs in {runner.run_dir}")
    report = runner.run_dir / "report.html"
    if report.exists():
        print(f"report: {report}")
    return gate_summary(steps, runner)


def gate_summary(steps, runner) -> int:
    """Print each benchmarked target's quality gate, and each gate an export checked on its own
    files (the webllm NumPy reference check); exit code 3 when one failed."""
    from toolchain.pipeline.artifacts import Artifact
    from toolchain.quality.gates import bench_verdict, verdict

    failed = 0
    for step in steps:
        if step.key is None or step.stage.kind not in ("bench", "export"):
            continue
        art = Artifact.open(runner.store.path_for(step.stage.id, step.key))
        fig = art.figures if art else {}
        if step.stage.kind == "bench":
            gates = {"": bench_verdict(fig)}
        else:
            gates = {f" {name}": verdict(fig.get("format"), name, chk.get("quality"))
                     for name, chk in (fig.get("reference_check") or {}).items()}
        for suffix, gate in gates.items():
            if gate:
                failed += not gate["passed"]
                state = "pass" if gate["passed"] else "FAIL (" + "; ".join(gate["failures"]) + ")"
                print(f"gate {gate['gate']:<14} {step.stage.id}{suffix}: {state}")
    if failed:
        print(f"edgesmith: {failed} target(s) failed their quality gate (thresholds in toolchain/quality/gates.py)",
              file=sys.stderr)
        return EXIT_GATE
    return EXIT_OK


def cmd_targets() -> int:
    from toolchain.pipeline.registry import EXPORTERS, RUNTIMES

    for title, reg in (("exporters", EXPORTERS), ("runtimes", RUNTIMES)):
        print(f"{title}:")
        for e in reg:
            missing = e.missing()
            state = "installed" if not missing else f"missing {', '.join(missing)} ({e.install_hint()})"
            extra = f" runtimes: {', '.join(e.runtimes)};" if title == "exporters" else ""
            print(f"  {e.name:<12} {e.summary};{extra} {state}")
    return 0
