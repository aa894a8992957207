"""The plug points: the stage table, the method table, the exporter table's gates, exact target names,
a cache key that follows library versions, and validation that imports nothing heavy."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from toolchain.core.errors import RecipeError
from toolchain.pipeline import registry
from toolchain.pipeline.plan import Stage, plan
from toolchain.pipeline.recipe import load_recipe
from toolchain.pipeline.registry import EXPORTERS, STAGES, Registry, StageEntry
from toolchain.quality.gates import TIERS, gate_for

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart.yaml"


def _recipe(tmp_path, doc: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _with_data(tmp_path, **extra) -> Path:
    return _recipe(tmp_path, {"name": "p", "data": {"path": str(REPO / "examples/data/dates.jsonl")}, **extra})


# -- gates ------------------------------------------------------------------------------------------

def test_every_precision_an_exporter_accepts_has_a_gate_tier():
    for entry in EXPORTERS:
        keys = entry.config_class().gate_keys()
        assert keys, entry.name
        for key in keys:
            tier = entry.gates.get(key)
            assert tier in TIERS, f"{entry.name}/{key} has no gate tier (add one to its row's gates)"
            assert gate_for(entry.name, key) is TIERS[tier]
            assert TIERS[tier].why, tier


def test_integer_int8_onnx_is_judged_per_token():
    cfg = EXPORTERS.get("onnx").config_class()
    assert cfg(precision="int8", int8_kernel="integer").gate_key == "int8-integer"
    assert gate_for("onnx", "int8-integer") is TIERS["INT8_PER_TOKEN"] is gate_for("webgpu", "int8")
    assert gate_for("onnx", "int8") is TIERS["INT8"]


# -- the plan ---------------------------------------------------------------------------------------

def test_the_plan_walks_the_stage_table_and_the_model_follows_merge(tmp_path):
    recipe = load_recipe(_with_data(tmp_path, targets=[{"name": "o", "format": "onnx"}]))
    stages = {s.id: s for s in plan(recipe)}
    assert list(stages) == ["data", "model", "train", "merge", "eval", "reference", "bench-torch", "export-o",
                            "bench-o-onnxruntime", "report"]
    assert stages["export-o"].role_map() == {"model": "merge"}
    assert stages["eval"].role_map() == {"base": "model", "model": "merge", "data": "data"}
    assert stages["export-o"].target == stages["bench-o-onnxruntime"].target == "o"
    assert "onnxruntime" in stages["bench-o-onnxruntime"].versions and "peft" in stages["train"].versions


def test_without_data_the_model_is_the_base(tmp_path):
    recipe = load_recipe(_recipe(tmp_path, {"name": "p", "targets": [{"name": "o", "format": "onnx"}]}))
    stages = {s.id: s for s in plan(recipe)}
    assert "merge" not in stages and stages["export-o"].role_map() == {"model": "model"}


def test_a_stage_plugs_in_with_one_row(tmp_path, monkeypatch):
    """A model-producing stage after merge (a pruner, say): one planner and one table row; every later
    stage reads its output as the model, and its section is an optional recipe key."""
    @dataclasses.dataclass
    class ShrinkSection:
        keep: float = 0.5

    def plan_shrink(recipe, state):
        return [Stage("shrink", "shrink", [state.model], {"keep": 0.5}, lambda *a: {}, "shrink",
                      roles={"model": state.model})]

    module = type(sys)("fake_shrink")
    module.plan, module.ShrinkSection = plan_shrink, ShrinkSection
    monkeypatch.setitem(sys.modules, "fake_shrink", module)
    row = StageEntry("shrink", "fake_shrink:plan", "a smaller model", section="shrink",
                     section_class="fake_shrink:ShrinkSection", produces_model=True)
    rows = list(STAGES)
    rows.insert(rows.index(STAGES.get("merge")) + 1, row)
    monkeypatch.setattr(registry, "STAGES", Registry("stage", rows))

    from toolchain.pipeline.recipe import Recipe, with_stage_sections
    from toolchain.pipeline.schema import Located, validate_section

    cls = with_stage_sections(Recipe, registry.STAGES)
    problems = []
    doc = {"name": "p", "shrink": {"keep": 0.25}}
    parsed = validate_section(doc, cls, "", Located("r.yaml"), problems)
    assert not problems and parsed.shrink == ShrinkSection(0.25)
    validate_section({"name": "p", "shrink": {"kept": 1}}, cls, "", Located("r.yaml"), problems)
    assert any("did you mean `keep`" in str(p) for p in problems)

    recipe = load_recipe(_with_data(tmp_path, targets=[{"name": "o", "format": "onnx"}]))
    stages = {s.id: s for s in plan(recipe)}
    assert list(stages)[:5] == ["data", "model", "train", "merge", "shrink"]
    assert stages["shrink"].role_map() == {"model": "merge"}
    assert stages["export-o"].role_map() == {"model": "shrink"}
    assert stages["reference"].role_map()["model"] == "shrink"


def test_a_training_method_plugs_in_with_one_row(tmp_path, monkeypatch):
    from toolchain.training.lora import Lora
    from toolchain.training.method import method_for

    class Wider(Lora):
        name = "wider"

    module = type(sys)("fake_method")
    module.METHOD = Wider()
    monkeypatch.setitem(sys.modules, "fake_method", module)
    monkeypatch.setattr(registry, "METHODS", Registry("training method", [
        *registry.METHODS, registry.MethodEntry("wider", "fake_method:METHOD", "test")]))
    monkeypatch.setattr("toolchain.pipeline.recipe.METHODS", registry.METHODS)
    recipe = load_recipe(_with_data(tmp_path, train={"method": "wider"}))
    assert method_for(recipe.train.method).name == "wider"
    with pytest.raises(RecipeError, match=r"train.method: must be one of lora, qlora, hft, wider, got 'widr' \(fix: did you mean"):
        load_recipe(_with_data(tmp_path, train={"method": "widr"}))


# -- the command line and the cache -----------------------------------------------------------------

def test_target_names_are_exact_and_globs_are_explicit():
    from toolchain.cli.run import pick_targets
    from toolchain.core.errors import EdgesmithError

    names = ["web", "web-q4", "web-fp32", "webllm", "onnx"]
    assert pick_targets(["web"], names) == {"web"}
    assert pick_targets(["web*"], names) == {"web", "web-q4", "web-fp32", "webllm"}
    assert pick_targets(["web-*", "onnx"], names) == {"web-q4", "web-fp32", "onnx"}
    with pytest.raises(EdgesmithError, match="--target we is not in the recipe"):
        pick_targets(["we"], names)


def test_the_cache_key_follows_the_versions_that_shape_a_stage(monkeypatch):
    from toolchain.pipeline import runner

    train = Stage("train", "train", [], {}, lambda *a: {}, versions=("peft",))
    data = Stage("data", "data", [], {}, lambda *a: {})
    before = runner.Runner.key(train, {}), runner.Runner.key(data, {})
    monkeypatch.setattr(runner, "distribution_versions", lambda names: {n: "99.0" for n in names})
    assert runner.Runner.key(train, {}) != before[0]  # an upgraded peft re-trains
    assert runner.Runner.key(data, {}) == before[1]  # and leaves the data split alone
    monkeypatch.setattr(runner, "__version__", "9.9.9")
    assert runner.Runner.key(data, {}) != before[1]  # an upgraded edgesmith re-runs everything


# -- validation -------------------------------------------------------------------------------------

def test_a_target_whose_extra_is_missing_gets_the_install_fix(tmp_path, monkeypatch):
    real = registry.importlib.util.find_spec
    monkeypatch.setattr(registry.importlib.util, "find_spec", lambda m, *a: None if m == "onnx" else real(m, *a))
    with pytest.raises(RecipeError) as info:
        load_recipe(_recipe(tmp_path, {"name": "p", "targets": [{"name": "o", "format": "onnx"}]}))
    assert "targets[0].format: needs onnx, which is not installed" in str(info.value)
    assert "pip install 'edgesmith[onnx]'" in str(info.value)


def test_validating_the_quickstart_imports_no_heavy_module():
    code = ("import sys; from toolchain.pipeline.recipe import load_recipe; load_recipe(sys.argv[1]); "
            "print(sorted(m for m in ('onnx', 'onnxruntime', 'torch', 'tvm', 'llama_cpp', 'transformers') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(QUICKSTART)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
