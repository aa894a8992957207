"""Recipe loading: typed values, every problem reported at once with place/rule/value/fix, overrides."""
from __future__ import annotations

import dataclasses as _dc

from toolchain.pipeline.recipe import Recipe as _Recipe
from toolchain.pipeline.registry import EXPORTERS

SECTIONS = [f.name for f in _dc.fields(_Recipe) if f.init]  # the recipe's top-level keys, in order

import re
import shutil
from pathlib import Path

import pytest

from toolchain.core.errors import RecipeError
from toolchain.pipeline.recipe import (
    BenchSection,
    DataSection,
    EvalSection,
    MergeSection,
    ModelSection,
    Recipe,
    ReportSection,
    TargetSection,
    TrainSection,
    load_recipe,
)
from toolchain.pipeline.schema import describe

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart.yaml"

# One mistake per line; the comment is the dotted key the problem must name.
BAD_RECIPE = """\
name: bad
modle: {source: x}
data:
  path: missing.jsonl
  format: chatt
train:
  learning_rate: fast
  warmup_ratio: 1.5
targets:
  - name: a
    format: onnx
    options: {precision: fp99}
  - name: a
    format: onnx
  - name: b
    format: tflite
"""


def _write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _problem_for(err: RecipeError, key: str):
    matches = [p for p in err.problems if p.where.endswith(f" {key}")]
    assert len(matches) == 1, f"expected one problem for {key}, got {[str(p) for p in err.problems]}"
    return matches[0]


# -- the quickstart recipe ------------------------------------------------------------------------

def test_quickstart_loads_with_typed_values():
    recipe = load_recipe(QUICKSTART)

    assert recipe.name == "quickstart"
    assert isinstance(recipe.train.learning_rate, float) and recipe.train.learning_rate == 0.002
    assert isinstance(recipe.train.epochs, float) and recipe.train.epochs == 1.0
    assert isinstance(recipe.train.lora.alpha, float) and recipe.train.lora.alpha == 32.0
    assert recipe.train.lora.rank == 16
    assert recipe.data.format == "chat" and recipe.data.eval_size == 48.0 and recipe.data.max_rows == 288
    import yaml
    assert [t.name for t in recipe.targets] == [t["name"] for t in yaml.safe_load(QUICKSTART.read_text())["targets"]]
    target = recipe.targets[0]
    assert isinstance(target, TargetSection)
    assert (target.name, target.format, target.options) == ("onnx-fp32", "onnx", {"precision": "fp32"})
    assert target.bench_runtimes == ["onnxruntime"]
    assert recipe.recipe_path == QUICKSTART.resolve()
    assert recipe.resolve(recipe.data.path) == REPO / "examples" / "data" / "dates.jsonl"
    # output_dir is relative to the folder the recipe was loaded from, and run_dir() absolute
    assert recipe.run_dir() == Path.cwd() / "runs" / "quickstart" and recipe.run_dir().is_absolute()


def test_run_dir_stays_where_the_recipe_was_loaded(tmp_path, monkeypatch):
    path = _write(tmp_path, "name: here\noutput_dir: out\n")
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(path.name)
    monkeypatch.chdir("/")  # a later chdir (a subprocess's cwd) does not move the run
    assert recipe.run_dir() == tmp_path / "out" / "here"
    absolute = load_recipe(path, {"output_dir": str(tmp_path / "abs")})
    assert absolute.run_dir() == tmp_path / "abs" / "here"


def test_defaults_fill_sections_the_recipe_omits(tmp_path):
    path = _write(tmp_path, "name: minimal\n")

    recipe = load_recipe(path)

    assert recipe.data is None
    assert recipe.targets == []
    assert recipe.model.source == "smollm2-135m-instruct"
    assert recipe.train.lora.target_modules[0] == "q_proj"
    assert recipe.bench.threads == 2


# -- many mistakes, one error ---------------------------------------------------------------------

def test_every_mistake_is_reported_in_one_error(tmp_path):
    path = _write(tmp_path, BAD_RECIPE)

    with pytest.raises(RecipeError) as info:
        load_recipe(path)

    err = info.value
    assert len(err.problems) == 8, "\n".join(map(str, err.problems))
    expected = {  # key: (line, rule fragment, value fragment, fix fragment)
        "modle": (2, "is not a known key", "'modle'", "did you mean `model`?"),
        "data.format": (5, "must be one of auto, chat", "'chatt'", "did you mean `chat`?"),
        "train.learning_rate": (7, "must be a number", "'fast'", "write a number"),
        "train.warmup_ratio": (8, "must be at most 1", "1.5", "1 or less"),
        "targets[0].options": (12, "`precision` must be one of 'fp32'", "'fp99'", "exporter's options"),
        "targets[1].name": (13, "repeats targets[0].name", "'a'", "unique name"),
        "targets[2].format": (16, "must be a registered exporter (" + ", ".join(EXPORTERS.names()) + ")", "'tflite'", "edgesmith targets"),
        "data.path": (4, "must name an existing file or directory", "'missing.jsonl'", "relative to the recipe's folder"),
    }
    for key, (line, rule, value, fix) in expected.items():
        problem = _problem_for(err, key)
        text = str(problem)
        assert problem.where == f"{path}:{line} {key}"
        assert rule in text and value in text, text
        assert problem.fix and fix in problem.fix, text
    message = str(err)
    assert message.startswith(f"{path} is not a valid recipe (8 problems):")
    assert message.count("\n  - ") == 8


def test_every_problem_carries_a_fix(tmp_path):
    path = _write(tmp_path, BAD_RECIPE)

    with pytest.raises(RecipeError) as info:
        load_recipe(path)

    assert [str(p) for p in info.value.problems if not p.fix] == []


@pytest.mark.parametrize("line, key, rule, fix", [
    ("train: {batch_size: 8.5}", "train.batch_size", "must be an integer", "whole number"),
    ("train: {save_checkpoints: 'yes'}", "train.save_checkpoints", "must be true or false", "true or false"),
    ("train: {lora: {target_modules: 3}}", "train.lora.target_modules", "must be a list of a string", "YAML list"),
    ("train: {lora: 4}", "train.lora", "must be a mapping", "YAML mapping"),
    ("train: {lora: {rank: 0}}", "train.lora.rank", "must be at least 1", "1 or more"),
    ("train: {max_steps: 0}", "train.max_steps", "must be -1 (use epochs) or a positive integer", "N > 0"),
    ("model: {dtype: int8}", "model.dtype", "must be one of float32, bfloat16, float16", "one of"),
    ("targets: [{name: 'bad name', format: onnx}]", "targets[0].name", "must be letters, digits", "onnx-fp32"),
    ("targets: [{name: t, format: onnx, runtimes: [tvm]}]", "targets[0].runtimes[0]", "registered runtime",
     "edgesmith targets"),
    ("targets: [{name: t, format: onnx, options: {opset: 99}}]", "targets[0].options", "`opset` must be an integer",
     "options"),
    ("targets: [{name: t, format: onnx, options: {bits: 4}}]", "targets[0].options", "bits", "options"),
])
def test_single_mistake_names_key_rule_and_fix(tmp_path, line, key, rule, fix):
    path = _write(tmp_path, f"name: one\n{line}\n")

    with pytest.raises(RecipeError) as info:
        load_recipe(path)

    problem = _problem_for(info.value, key)
    assert problem.where == f"{path}:2 {key}"
    assert rule in str(problem)
    assert fix in problem.fix


def test_missing_required_key_is_named(tmp_path):
    path = _write(tmp_path, "data: {format: chat}\n")

    with pytest.raises(RecipeError) as info:
        load_recipe(path)

    rules = {p.where: p.rule for p in info.value.problems}
    assert rules[f"{path} name"] == "needs the key `name`"
    assert rules[f"{path}:1 data"] == "needs the key `path`"


def test_unknown_top_level_section_lists_the_known_sections(tmp_path):
    path = _write(tmp_path, "name: x\nsparsify: {fraction: 0.5}\n")

    with pytest.raises(RecipeError) as info:
        load_recipe(path)

    (problem,) = info.value.problems
    assert problem.where == f"{path}:2 sparsify"
    assert problem.rule == "is not a known key"
    assert problem.value == "sparsify"
    assert problem.fix == "known keys: " + ", ".join(SECTIONS)


def test_recipe_path_is_not_a_recipe_key(tmp_path):
    path = _write(tmp_path, "name: x\nrecipe_path: /etc\n")

    with pytest.raises(RecipeError) as info:
        load_recipe(path)

    (problem,) = info.value.problems
    assert problem.where == f"{path}:2 recipe_path"
    assert problem.rule == "is not a known key"


# -- files that are not recipes -------------------------------------------------------------------

def test_yaml_syntax_error_names_line_and_column(tmp_path):
    path = _write(tmp_path, "name: x\ntrain: a: b\n")

    with pytest.raises(RecipeError) as info:
        load_recipe(path)

    err = info.value
    assert err.title == "the recipe is not valid YAML"
    (problem,) = err.problems
    assert problem.where == f"{path}:2:9"
    assert problem.value == "mapping values are not allowed here"
    assert "line and column" in problem.fix


def test_yaml_that_is_a_list_is_refused(tmp_path):
    path = _write(tmp_path, "- name: x\n- name: y\n")

    with pytest.raises(RecipeError) as info:
        load_recipe(path)

    (problem,) = info.value.problems
    assert info.value.title == "the recipe is not a mapping"
    assert problem.rule == "must be a YAML mapping of sections"
    assert problem.value == [{"name": "x"}, {"name": "y"}]
    assert "quickstart.yaml" in problem.fix


def test_empty_file_is_refused(tmp_path):
    path = _write(tmp_path, "# nothing here\n")

    with pytest.raises(RecipeError, match="the recipe is not a mapping"):
        load_recipe(path)


def test_missing_recipe_file(tmp_path):
    path = tmp_path / "nope.yaml"

    with pytest.raises(RecipeError) as info:
        load_recipe(path)

    (problem,) = info.value.problems
    assert info.value.title == "cannot read the recipe"
    assert problem.where == str(path)
    assert problem.rule == "must be an existing YAML file"
    assert "check the path" in problem.fix


def test_a_directory_is_not_a_recipe(tmp_path):
    with pytest.raises(RecipeError, match="must be an existing YAML file"):
        load_recipe(tmp_path)


# -- overrides (--set) ----------------------------------------------------------------------------

def test_override_sets_a_nested_value():
    recipe = load_recipe(QUICKSTART, {"train.max_steps": 5, "train.lora.rank": 4, "output_dir": "/tmp/elsewhere"})

    assert recipe.train.max_steps == 5
    assert recipe.train.lora.rank == 4
    assert recipe.train.lora.alpha == 32.0  # siblings in the file are kept
    assert recipe.output_dir == "/tmp/elsewhere"


def test_override_creates_an_omitted_section(tmp_path):
    shutil.copy(REPO / "examples" / "data" / "dates.jsonl", tmp_path / "d.jsonl")
    path = _write(tmp_path, "name: x\n")

    recipe = load_recipe(path, {"data.path": "d.jsonl", "merge.dtype": "bfloat16"})

    assert isinstance(recipe.data, DataSection) and recipe.data.path == "d.jsonl"
    assert recipe.merge.dtype == "bfloat16"


def test_bad_override_value_is_attributed_to_set():
    with pytest.raises(RecipeError) as info:
        load_recipe(QUICKSTART, {"train.max_steps": 0})

    (problem,) = info.value.problems
    assert problem.where == "--set train.max_steps"
    assert problem.value == 0


def test_override_into_a_scalar_is_a_recipe_error():
    with pytest.raises(RecipeError) as info:
        load_recipe(QUICKSTART, {"name.first": 1})

    (problem,) = info.value.problems
    assert problem.where == "--set name.first"
    assert "needs `name` to be a section" in problem.rule
    assert problem.value == "quickstart"


def test_override_does_not_change_the_file():
    before = QUICKSTART.read_text()

    load_recipe(QUICKSTART, {"train.max_steps": 5})

    assert QUICKSTART.read_text() == before


# -- reference text -------------------------------------------------------------------------------

def test_describe_lists_every_section_and_its_keys():
    lines = describe(Recipe)

    top = [ln.split(":")[0] for ln in lines if ln and not ln.startswith(" ")]
    assert top == SECTIONS
    text = "\n".join(lines)
    for cls, prefix in [(ModelSection, "  "), (DataSection, "  "), (TrainSection, "  "), (MergeSection, "  "),
                        (EvalSection, "  "), (TargetSection, "  "), (BenchSection, "  "), (ReportSection, "  ")]:
        for name in cls.__dataclass_fields__:
            assert re.search(rf"^{prefix}{re.escape(name)}:", text, re.M), f"{cls.__name__}.{name} missing"
    assert re.search(r"^    rank: 16  # an integer; LoRA rank r$", text, re.M)
    assert "  path: '(required)'" in text  # data.path, inside the optional data section
    assert "recipe_path" not in text
