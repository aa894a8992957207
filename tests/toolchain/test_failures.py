"""Failures read as errors: the stage, the cause in one line, the log file with the traceback, and an
exit code per kind of failure (toolchain.cli.EXIT_CODES); never a raw traceback on the terminal."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from toolchain import cli
from toolchain.core.errors import StageError, StageFailed
from toolchain.pipeline.plan import Stage
from toolchain.stages.bench import make_bench


def _recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"name: broken\noutput_dir: {tmp_path / 'runs'}\n")
    return path


def _failing_plan(exc):
    def boom(ctx, inputs, out):
        (out / "half-written.bin").write_bytes(b"x")
        raise exc

    return lambda recipe: [Stage("model", "model", [], {"x": 1}, boom, "a stage that fails")]


@pytest.mark.parametrize("exc, cause", [
    (ValueError("shapes (3,) and (4,) do not align\nsecond line"), "ValueError: shapes (3,) and (4,) do not align"),
    (StageError("training diverged: final loss is nan (fix: lower train.learning_rate)"),
     "training diverged: final loss is nan (fix: lower train.learning_rate)"),
])
def test_a_failed_stage_prints_stage_cause_and_log_and_exits_4(tmp_path, capsys, monkeypatch, exc, cause):
    monkeypatch.setattr("toolchain.pipeline.runner.plan", _failing_plan(exc))

    code = cli.main(["run", str(_recipe(tmp_path)), "--quiet"])

    err = capsys.readouterr().err
    assert code == cli.EXIT_STAGE == 4
    assert f"edgesmith: stage model failed: {cause}\n" in err
    assert "Traceback" not in err and "second line" not in err
    log = tmp_path / "runs" / "broken" / "logs" / "model.log"
    assert f"full log: {log}" in err
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "boom" in text
    # the half-written output stays a .partial folder: nothing looks whole
    assert all(p.name.endswith(".partial") for p in (tmp_path / "runs" / "broken" / "artifacts").iterdir())


def test_an_internal_error_outside_stages_is_logged_and_exits_1(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EDGESMITH_CACHE", str(tmp_path / "cache"))

    def broken(args):
        raise KeyError("surprise")

    monkeypatch.setattr(cli.run, "cmd_targets", lambda: broken(None))
    code = cli.main(["targets"])

    err = capsys.readouterr().err
    assert code == cli.EXIT_INTERNAL == 1
    assert "edgesmith: internal error: KeyError: 'surprise'" in err and "Traceback" not in err
    (log,) = (tmp_path / "cache" / "logs").glob("edgesmith-*.log")
    assert f"full log: {log}" in err and "Traceback" in log.read_text()


def test_every_exit_code_is_documented():
    assert set(cli.EXIT_CODES) == {0, 1, 2, 3, 4, 130}
    for code in cli.EXIT_CODES:
        assert f"{code} " in cli.__doc__


class _Art:
    def __init__(self, path, figures=None):
        self.path, self.figures = path, figures or {}


def test_a_bench_worker_failure_is_one_line_with_the_worker_log(tmp_path):
    """The worker (a subprocess) fails loading the artifact: the cause is its exception in one line, and its
    traceback is in worker.log, which the runner copies into the run's log."""
    from types import SimpleNamespace

    from toolchain.pipeline.recipe import BenchSection

    missing = tmp_path / "no-such-model"
    ref = tmp_path / "reference"
    ref.mkdir()
    out = tmp_path / "bench.partial"
    out.mkdir()
    run = make_bench("onnxruntime", "onnx", "export-onnx")
    ctx = SimpleNamespace(recipe=SimpleNamespace(bench=BenchSection()))
    with pytest.raises(StageError) as info:
        run(ctx, {"artifact": _Art(missing), "reference": _Art(ref)}, out)
    msg = str(info.value)
    assert msg.startswith("benchmark of onnx on onnxruntime: ") and "\n" not in msg
    assert info.value.log == out.resolve() / "worker.log"
    assert "Traceback" in info.value.log.read_text()


def test_the_worker_reports_a_signal_death_by_name(tmp_path):
    from toolchain.stages.bench import worker_cause

    proc = subprocess.run([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"],
                          capture_output=True, text=True)
    assert worker_cause(proc, tmp_path / "result.json") == f"the worker was killed by SIGSEGV (exit code {proc.returncode})"
    (tmp_path / "result.json.error.json").write_text(json.dumps({"type": "OSError", "message": "no file\nmore"}))
    assert worker_cause(proc, tmp_path / "result.json") == "OSError: no file"


def test_stage_failed_message_has_the_log():
    e = StageFailed("bench-x", "RuntimeError: chromium died", "/tmp/r/logs/bench-x.log")
    assert str(e) == "stage bench-x failed: RuntimeError: chromium died\n  full log: /tmp/r/logs/bench-x.log"
