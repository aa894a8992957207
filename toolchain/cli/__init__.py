"""The `edgesmith` command line.

    edgesmith run RECIPE            every stage: data, train, merge, eval, export, bench, report
    edgesmith train|merge|export|bench|report RECIPE
                                    the same pipeline, stopping after that stage (cached stages reused)
    edgesmith chat BUNDLE           chat with a GGUF bundle in the terminal (streams tokens, chat template)
    edgesmith serve BUNDLE          OpenAI-compatible chat completions over HTTP (127.0.0.1)
    edgesmith targets               registered exporters and runtimes, and whether their extras are installed
    edgesmith doctor                checks packages, CPU features, chromium and disk
    edgesmith init NAME --data FILE a commented starter recipe for your data
    edgesmith prune-compare RECIPE  dense against pruning variants (size, speed, quality) in one sitting
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

from toolchain import __version__
from toolchain.cli import run
from toolchain.cli.exitcodes import (  # noqa: F401
    EXIT_CODES,
    EXIT_GATE,
    EXIT_INPUT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_STAGE,
)
from toolchain.core.errors import EdgesmithError, StageError, StageFailed, one_line

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
    from toolchain.cli.chat import add_chat_parser
    from toolchain.cli.serve import add_serve_parser

    add_chat_parser(sub)
    add_serve_parser(sub)
    p = sub.add_parser("doctor", help="check the environment", description="Check Python packages, CPU features, "
                       "chromium, the embedded model and free disk; exits non-zero when something required is missing.")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    from toolchain.cli.init import add_init_parser
    from toolchain.cli.setup import add_setup_parser

    from toolchain.cli.prune_compare import add_prune_compare_parser

    add_init_parser(sub)
    add_setup_parser(sub)
    add_prune_compare_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 1
    try:
        if args.command == "run":
            return run.cmd_pipeline(args, None)
        if args.command in STAGE_COMMANDS:
            return run.cmd_pipeline(args, STAGE_COMMANDS[args.command][0])
        if args.command == "targets":
            return run.cmd_targets()
        if args.command == "chat":
            from toolchain.cli.chat import run_chat
            return run_chat(args)
        if args.command == "serve":
            from toolchain.cli.serve import run_serve
            return run_serve(args)
        if args.command == "doctor":
            from toolchain.cli.doctor import run_doctor
            return run_doctor(as_json=args.json)
        if args.command == "init":
            from toolchain.cli.init import run_init
            return run_init(args)
        if args.command == "setup":
            from toolchain.cli.setup import run_setup
            return run_setup(args)
        if args.command == "prune-compare":
            from toolchain.cli.prune_compare import run_prune_compare
            return run_prune_compare(args)
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

    from toolchain.core.files import write_text_atomic
    from toolchain.core.webassets import cache_root

    log = cache_root() / "logs" / f"edgesmith-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(log, f"edgesmith {__version__}: {' '.join(sys.argv)}\n\n"
                      + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    return log

