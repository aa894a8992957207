"""The exit codes of `edgesmith`, one per kind of outcome (the README lists them)."""

EXIT_OK, EXIT_INTERNAL, EXIT_INPUT, EXIT_GATE, EXIT_STAGE, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
EXIT_CODES = {
    EXIT_OK: "done",
    EXIT_INTERNAL: "internal error (a bug in edgesmith; the traceback is in the log file named)",
    EXIT_INPUT: "the input is wrong: recipe, data, command line or a target that cannot take this model",
    EXIT_GATE: "a target failed its quality gate",
    EXIT_STAGE: "a stage failed (a tool or worker crashed, training diverged); the log file is named",
    EXIT_INTERRUPTED: "interrupted",
}
