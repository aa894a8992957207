"""The `edgesmith` command line: help texts, targets, doctor, clean errors (exit 2) and --dry-run plans."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from toolchain import __version__
from toolchain.cli import main

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "examples" / "quickstart.yaml"

HELP_WORDS = {
    "run": "Run every stage of a recipe",
    "train": "Fine-tune (LoRA) on the recipe's data",
    "merge": "Merge the adapter into a full-precision copy of the base model",
    "export": "Export the merged model to the recipe's targets",
    "bench": "Benchmark every target on its runtimes",
    "report": "Write report.json, report.md and report.html",
    "targets": "List registered exporters and runtimes",
    "doctor": "Check Python packages, CPU features",
}
# stage id -> the stages it needs (what the plan must have listed before it)
def _quickstart_stages() -> dict[str, list[str]]:
    """The stages the quickstart must plan, with the inputs each must come after."""
    import yaml

    targets = yaml.safe_load(QUICKSTART.read_text())["targets"]
    stages = {
        "model": [], "data": [], "train": ["model", "data"], "merge": ["model", "train"],
        "eval": ["model", "merge", "data"], "reference": ["merge", "data"], "bench-torch": ["merge", "reference"],
    }
    runtimes = {"onnx": "onnxruntime", "gguf": "llama.cpp", "gguf-lora": "llama.cpp"}
    for t in targets:
        needs = ["merge"]
        if t.get("options", {}).get("imatrix"):
            stages["calibrate"] = ["model", "data"]
            stages["imatrix"] = ["merge", "calibrate"]
            needs.append("imatrix")
        if t["format"] == "gguf-lora":
            needs += ["model", "train"]
        stages[f"export-{t['name']}"] = needs
        for runtime in t.get("runtimes") or [runtimes[t["format"]]]:
            stages[f"bench-{t['name']}-{runtime}"] = [f"export-{t['name']}", "reference"]
    return stages


QUICKSTART_STAGES = _quickstart_stages()


def _flat(text: str) -> str:
    return " ".join(text.split())  # argparse wraps descriptions at the terminal width


def _plan_ids(out: str) -> list[tuple[str, str]]:
    return re.findall(r"^\s+\d+\. (\S+)\s+(RUN|CACHED)\s", out, re.M)


# -- help -----------------------------------------------------------------------------------------

def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])

    assert info.value.code == 0
    out = _flat(capsys.readouterr().out)
    assert "Fine-tune a small language model and ship it to edge targets" in out
    for cmd in HELP_WORDS:
        assert cmd in out


@pytest.mark.parametrize("cmd", sorted(HELP_WORDS))
def test_command_help(cmd, capsys):
    with pytest.raises(SystemExit) as info:
        main([cmd, "--help"])

    assert info.value.code == 0
    out = _flat(capsys.readouterr().out)
    assert out.startswith(f"usage: edgesmith {cmd}")
    assert HELP_WORDS[cmd] in out


@pytest.mark.parametrize("cmd", ["run", "train", "merge", "export", "bench", "report"])
def test_pipeline_commands_take_the_recipe_options(cmd, capsys):
    with pytest.raises(SystemExit):
        main([cmd, "--help"])

    out = capsys.readouterr().out
    for option in ("--dry-run", "--resume", "--force STAGE", "--set KEY=VALUE", "--quiet"):
        assert option in out
    assert ("--target" in out) == (cmd in ("export", "bench"))


def test_no_command_prints_help_and_returns_1(capsys):
    assert main([]) == 1
    assert "usage: edgesmith" in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])

    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"edgesmith {__version__}"


def test_console_script_is_installed():
    exe = shutil.which("edgesmith")
    if exe is None:
        pytest.skip("the edgesmith console script is not on PATH (package not installed)")

    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)

    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"edgesmith {__version__}"


# -- targets and doctor ---------------------------------------------------------------------------

def test_targets_lists_exporters_and_runtimes(capsys):
    assert main(["targets"]) == 0

    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "exporters:"
    assert "runtimes:" in lines
    exporters = lines[1:lines.index("runtimes:")]
    runtimes = lines[lines.index("runtimes:") + 1:]
    from toolchain.pipeline.registry import EXPORTERS, RUNTIMES
    assert [ln.split()[0] for ln in exporters] == EXPORTERS.names()
    assert [ln.split()[0] for ln in runtimes] == RUNTIMES.names()
    assert {"onnx", "torch", "onnxruntime"} <= set(EXPORTERS.names() + RUNTIMES.names())
    assert "runtimes: onnxruntime;" in exporters[0]
    # every missing piece names its fix: a pip extra, or the command beside each missing tool
    assert all(ln.endswith("installed") or "pip install 'edgesmith[" in ln or "(fix: " in ln
               for ln in exporters + runtimes)


def test_doctor_json(capsys):
    code = main(["doctor", "--json"])

    checks = json.loads(capsys.readouterr().out)
    by_name = {c["name"]: c for c in checks}
    assert set(by_name) >= {"python", "torch", "transformers", "cpu", "chromium", "disk", "embedded-model"}
    assert all(set(c) == {"name", "ok", "detail", "required", "fix"} for c in checks)
    assert all(c["fix"] for c in checks if not c["ok"] and c["name"] not in ("cpu", "disk")), \
        "every missing piece names the command that installs it"
    disk = by_name["disk"]
    assert disk["required"] is True and "GiB free in" in disk["detail"]
    assert by_name["torch"]["ok"] is True
    failed_required = [c["name"] for c in checks if c["required"] and not c["ok"]]
    assert code == (1 if failed_required else 0)


# -- clean errors ---------------------------------------------------------------------------------

def test_missing_recipe_is_a_clean_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)

    code = main(["run", "missing.yaml"])

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("edgesmith: cannot read the recipe (1 problem):")
    assert "missing.yaml: must be an existing YAML file" in err
    assert "Traceback" not in err


def test_invalid_recipe_lists_its_problems(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\ntrain: {lora: {rank: 0}, lr: 1}\n")

    code = main(["run", str(recipe), "--dry-run"])

    err = capsys.readouterr().err
    assert code == 2
    assert f"{recipe}:2 train.lora.rank: must be at least 1" in err
    assert f"{recipe}:2 train.lr: is not a known key" in err
    assert "Traceback" not in err


def test_set_without_equals_is_a_clean_error(capsys):
    code = main(["run", str(QUICKSTART), "--set", "nokey", "--dry-run"])

    err = capsys.readouterr().err
    assert code == 2
    assert "--set 'nokey' must look like KEY=VALUE" in err
    assert "Traceback" not in err


def test_set_into_a_scalar_is_a_clean_error(capsys):
    code = main(["run", str(QUICKSTART), "--set", "name.x=1", "--dry-run"])

    err = capsys.readouterr().err
    assert code == 2
    assert "--set name.x: needs `name` to be a section" in err
    assert "Traceback" not in err


def test_unknown_export_target_names_the_known_ones(tmp_path, capsys):
    code = main(["export", str(QUICKSTART), "--target", "nope", "--dry-run", "--set", f"output_dir={tmp_path}"])

    err = capsys.readouterr().err
    assert code == 2
    assert "--target nope is not in the recipe (targets: " in err and "onnx-fp32" in err
    assert not (tmp_path / "quickstart").exists()


# -- dry-run plans --------------------------------------------------------------------------------

def test_run_dry_run_lists_every_stage(tmp_path, capsys):
    code = main(["run", str(QUICKSTART), "--dry-run", "--set", f"output_dir={tmp_path}"])

    out = capsys.readouterr().out
    assert code == 0
    assert out.splitlines()[0] == f"plan for quickstart -> {tmp_path / 'quickstart'}"
    plan = _plan_ids(out)
    ids = [sid for sid, _ in plan]
    assert sorted(ids) == sorted([*QUICKSTART_STAGES, "report"])
    assert ids[-1] == "report"
    for sid, needs in QUICKSTART_STAGES.items():
        assert all(ids.index(dep) < ids.index(sid) for dep in needs), (sid, ids)
    assert {status for _, status in plan} == {"RUN"}  # an empty output_dir has nothing cached
    assert not (tmp_path / "quickstart").exists()  # a dry run writes nothing


def test_export_dry_run_plans_only_what_the_target_needs(tmp_path, capsys):
    code = main(["export", str(QUICKSTART), "--target", "onnx-fp32", "--dry-run", "--set", f"output_dir={tmp_path}"])

    ids = [sid for sid, _ in _plan_ids(capsys.readouterr().out)]
    assert code == 0
    assert sorted(ids) == ["data", "export-onnx-fp32", "merge", "model", "train"]


def test_dry_run_without_reference_bench_drops_bench_torch(tmp_path, capsys):
    code = main(["run", str(QUICKSTART), "--dry-run", "--set", f"output_dir={tmp_path}", "--set", "bench.reference=false"])

    ids = [sid for sid, _ in _plan_ids(capsys.readouterr().out)]
    assert code == 0
    assert "bench-torch" not in ids and "bench-onnx-fp32-onnxruntime" in ids


def _quality(kl: float, top1: float, ppl: float) -> dict:
    nan = float("nan")
    return {"ppl": ppl, "ref_ppl": 10.0, "kl_mean": kl, "kl_max": kl, "top1_agreement": top1,
            "greedy_match": nan, "greedy_prefix": nan, "tokens": 255, "ppl_delta": ppl - 10.0}


def test_gate_summary_counts_bench_rows_and_export_reference_checks(tmp_path, capsys):
    """Exit code 3 names every failed gate: a benchmarked row judged on its quality, and an export
    that checked its own files (webllm's NumPy reference check), judged on the current table."""
    from types import SimpleNamespace

    from toolchain.cli.run import gate_summary
    from toolchain.pipeline.artifacts import ArtifactStore

    store = ArtifactStore(tmp_path)
    made = []

    def step(stage_id: str, kind: str, figures: dict):
        store.partial_path(stage_id, "k").mkdir(parents=True)
        store.commit(stage_id, kind, "k", {}, {}, figures, 0.1)
        made.append(SimpleNamespace(stage=SimpleNamespace(id=stage_id, kind=kind), key="k"))

    good, bad = _quality(1e-9, 1.0, 10.0), _quality(0.9, 0.4, 20.0)
    step("bench-web-fp32-onnxruntime", "bench", {"format": "webgpu", "precision": "fp32", "quality": good})
    runner = SimpleNamespace(store=store)
    assert gate_summary(made, runner) == 0
    assert "gate webgpu/fp32" in capsys.readouterr().out

    checks = {"q0f32": {"quality": good, "gate": {"passed": True}},
              # the stored verdict said pass; the current table is what counts
              "q4f16_1": {"quality": bad, "gate": {"passed": True}}}
    step("export-webllm", "export", {"format": "webllm", "precision": "q0f32", "reference_check": checks})
    assert gate_summary(made, runner) == 3
    out, err = capsys.readouterr()
    assert "gate webllm/q0f32   export-webllm q0f32: pass" in out
    assert "gate webllm/q4f16_1 export-webllm q4f16_1: FAIL (KL 0.9 > 0.8; top-1 0.400 < 0.5" in out
    assert "1 target(s) failed their quality gate" in err
