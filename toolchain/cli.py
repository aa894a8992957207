"""The `edgesmith` command line.

    edgesmith run RECIPE            every stage: data, train, merge, eval, export, bench, report
    edgesmith train|merge|export|bench|report RECIPE
                                    the same pipeline, stopping after that stage (cached stages reused)
    edgesmith chat BUNDLE           chat with a GGUF bundle in the terminal (streams tokens, chat template)
    edgesmith serve BUNDLE          OpenAI-compatible chat completions over HTTP (127.0.0.1)
    edgesmith targets               registered exporters and runtimes, and whether their extras are installed
    edgesmith doctor                checks packages, CPU features, chromium and disk
    edgesmith init NAME --data FILE a commented starter recipe for your data
    edgesmith setup [web|llama-cpp|model]
                                    install what lies outside pip: npm packages, llama.cpp, the embedded model

Exit codes (EXIT_CODES): 0 done; 1 an internal error (a bug: the traceback is in a log file); 2 the input
is wrong (recipe, data, command line, a target that cannot take this model: the message names the fix);
3 a quality gate failed; 4 a stage failed (a tool or worker crashed, training diverged: stage, cause and
log file are printed); 130 interrupted.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from toolchain import __version__
from toolchain.errors import EdgesmithError, StageError, StageFailed, one_line

EXIT_OK, EXIT_INTERNAL, EXIT_INPUT, EXIT_GATE, EXIT_STAGE, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
EXIT_CODES = {
    EXIT_OK: "done",
    EXIT_INTERNAL: "internal error (a bug in edgesmith; the traceback is in the log file named)",
    EXIT_INPUT: "the input is wrong: recipe, data, command line or a target that cannot take this model",
    EXIT_GATE: "a target failed its quality gate",
    EXIT_STAGE: "a stage failed (a tool or worker crashed, training diverged); the log file is named",
    EXIT_INTERRUPTED: "interrupted",
}

STAGE_COMMANDS = {
    "train": ("train", "Fine-tune (LoRA) on the recipe's data; writes a PEFT adapter directory."),
    "merge": ("merge", "Merge the adapter into a full-precision copy of the base model."),
    "export": ("export", "Export the merged model to the recipe's targets (all, or --target NAME)."),
    "bench": ("bench", "Benchmark every target on its runtimes (speed and quality vs the merged model)."),
    "report": ("report", "Write report.json, report.md and report.html with plots."),
}


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="path to the recipe YAML (see examples/quickstart.yaml)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (stages, cached or to run) and stop")
    p.add_argument("--resume", action="store_true", help="continue an interrupted training from its last checkpoint")
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="re-run a stage (id like bench-onnx-fp32-onnxruntime, or a kind like bench) even if cached")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set train.max_steps=10 (value parsed as YAML)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgesmith", description="Fine-tune a small language model and ship it to "
                                     "edge targets in one run, with a latency and quality benchmark per target.")
    parser.add_argument("--version", action="version", version=f"edgesmith {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("run", help="run every stage of a recipe", description="Run every stage of a recipe: model, "
                       "data, train, merge, eval, reference, export, bench, report. Unchanged stages are reused.")
    _add_recipe_args(p)
    for name, (_, text) in STAGE_COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text + " Earlier stages run or are reused as needed.")
        _add_recipe_args(p)
        if name in ("export", "bench"):
            p.add_argument("--target", action="append", default=[], help="only this target (repeatable)")
    sub.add_parser("targets", help="list exporters and runtimes and whether their extras are installed",
                   description="List registered exporters and runtimes; shows what is missing to use each.")
    from toolchain.chatcli import add_chat_parser
    from toolchain.serve import add_serve_parser

    add_chat_parser(sub)
    add_serve_parser(sub)
    p = sub.add_parser("doctor", help="check the environment", description="Check Python packages, CPU features, "
                       "chromium, the embedded model and free disk; exits non-zero when something required is missing.")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    from toolchain.setup import add_setup_parser
    from toolchain.starter import add_init_parser

    add_init_parser(sub)
    add_setup_parser(sub)
    return parser


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise EdgesmithError(f"--set {item!r} must look like KEY=VALUE (e.g. train.max_steps=10)")
        out[key.strip()] = yaml.safe_load(value)
    return out


def cmd_pipeline(args, until: str | None) -> int:
    from toolchain.recipe import load_recipe
    from toolchain.runner import Runner, select
    from toolchain.stages import Context

    recipe = load_recipe(args.recipe, parse_overrides(args.set))
    ctx = Context(recipe, progress=not args.quiet and sys.stderr.isatty() or os.environ.get("EDGESMITH_PROGRESS") == "1",
                  resume=args.resume)
    if not ctx.progress:  # transformers' and huggingface_hub's own bars too (read at import; workers inherit it)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    runner = Runner(ctx)
    only = None
    if getattr(args, "target", None):
        names = {t.name for t in recipe.targets}
        unknown = [t for t in args.target if t not in names]
        if unknown:
            raise EdgesmithError(f"--target {', '.join(unknown)} is not in the recipe (targets: {', '.join(sorted(names))})")
        prefix = "export-" if until == "export" else "bench-"
        only = [s.id for s in runner.stages if any(s.id.startswith(f"{prefix}{t}") for t in args.target)]
        until = None
    stages = select(runner.stages, until=until, only=only)
    force = set(args.force)
    if until == "bench" and getattr(args, "force_all", False):
        force.add("bench")
    if args.dry_run:
        print(f"plan for {recipe.name} -> {runner.run_dir}")
        for i, step in enumerate(runner.decide(stages, force), 1):
            where = f"{step.stage.id}-{step.key}" if step.key else step.stage.id
            why = f" ({step.reason})" if step.reason else ""
            print(f"  {i:2d}. {step.stage.id:<34} {step.status.upper():<7} {step.stage.summary}{why}  [{where}]")
        return 0
    steps = runner.execute(stages, force)
    ran = sum(1 for s in steps if s.status == "run")
    print(f"{len(steps)} stages: {ran} ran, {len(steps) - ran} reused. Outputs in {runner.run_dir}")
    report = runner.run_dir / "report.html"
    if report.exists():
        print(f"report: {report}")
    return gate_summary(steps, runner)


def gate_summary(steps, runner) -> int:
    """Print each benchmarked target's quality gate, and each gate an export checked on its own
    files (the webllm NumPy reference check); exit code 3 when one failed."""
    from toolchain.artifacts import Artifact
    from toolchain.gates import verdict

    failed = 0
    for step in steps:
        if step.key is None or step.stage.kind not in ("bench", "export"):
            continue
        art = Artifact.open(runner.store.path_for(step.stage.id, step.key))
        fig = art.figures if art else {}
        if step.stage.kind == "bench":
            gates = {"": verdict(fig.get("format"), fig.get("precision"), fig.get("quality"))}
        else:
            gates = {f" {name}": verdict(fig.get("format"), name, chk.get("quality"))
                     for name, chk in (fig.get("reference_check") or {}).items()}
        for suffix, gate in gates.items():
            if gate:
                failed += not gate["passed"]
                state = "pass" if gate["passed"] else "FAIL (" + "; ".join(gate["failures"]) + ")"
                print(f"gate {gate['gate']:<14} {step.stage.id}{suffix}: {state}")
    if failed:
        print(f"edgesmith: {failed} target(s) failed their quality gate (thresholds in toolchain/gates.py)",
              file=sys.stderr)
        return EXIT_GATE
    return EXIT_OK


def cmd_targets() -> int:
    from toolchain.registry import DEFAULT_RUNTIMES, EXPORTERS, RUNTIMES

    for title, reg in (("exporters", EXPORTERS), ("runtimes", RUNTIMES)):
        print(f"{title}:")
        for e in reg:
            missing = e.missing()
            state = "installed" if not missing else f"missing {', '.join(missing)} ({e.install_hint()})"
            extra = f" runtimes: {', '.join(DEFAULT_RUNTIMES.get(e.name, []))};" if title == "exporters" else ""
            print(f"  {e.name:<12} {e.summary};{extra} {state}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 1
    try:
        if args.command == "run":
            return cmd_pipeline(args, None)
        if args.command in STAGE_COMMANDS:
            return cmd_pipeline(args, STAGE_COMMANDS[args.command][0])
        if args.command == "targets":
            return cmd_targets()
        if args.command == "chat":
            from toolchain.chatcli import run_chat
            return run_chat(args)
        if args.command == "serve":
            from toolchain.serve import run_serve
            return run_serve(args)
        if args.command == "doctor":
            from toolchain.doctor import run_doctor
            return run_doctor(as_json=args.json)
        if args.command == "init":
            from toolchain.starter import run_init
            return run_init(args)
        if args.command == "setup":
            from toolchain.setup import run_setup
            return run_setup(args)
    except (StageFailed, StageError) as exc:
        print(f"edgesmith: {exc}", file=sys.stderr)
        return EXIT_STAGE
    except EdgesmithError as exc:
        print(f"edgesmith: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stderr.close()
        return EXIT_OK
    except KeyboardInterrupt:
        print("edgesmith: interrupted; finished stages are kept, the unfinished one left as .partial", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: one line on the terminal, the traceback in a file
        log = internal_error_log(exc)
        print(f"edgesmith: internal error: {type(exc).__name__}: {one_line(exc)}\n  full log: {log}\n"
              f"  (a bug in edgesmith: please report it with that file)", file=sys.stderr)
        return EXIT_INTERNAL
    return EXIT_OK


def internal_error_log(exc: BaseException) -> Path:
    """The traceback of an unexpected error, in ``<cache>/logs/`` (the run folder may not exist yet)."""
    import time
    import traceback

    from toolchain.artifacts import write_text_atomic
    from toolchain.webassets import cache_root

    log = cache_root() / "logs" / f"edgesmith-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(log, f"edgesmith {__version__}: {' '.join(sys.argv)}\n\n"
                      + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    return log


if __name__ == "__main__":
    raise SystemExit(main())
