"""`edgesmith init NAME --data FILE`: a starter recipe the loader accepts, for each row format."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from toolchain.cli import main
from toolchain.cli.init import QUICKSTART_TARGETS
from toolchain.pipeline.recipe import load_recipe

REPO = Path(__file__).resolve().parents[2]

ROWS = {
    "chat": {"messages": [{"role": "user", "content": "When? 3 May 2021"}, {"role": "assistant", "content": "2021-05-03"}]},
    "instruction": {"instruction": "Write the date", "input": "3 May 2021", "output": "2021-05-03"},
    "prompt_completion": {"prompt": "3 May 2021 ->", "completion": " 2021-05-03"},
    "text": {"text": "On 3 May 2021 it rained."},
}


def _jsonl(path: Path, row: dict, n: int = 30) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for _ in range(n)))
    return path


@pytest.mark.parametrize("fmt", sorted(ROWS))
def test_init_detects_the_format_and_writes_a_valid_recipe(tmp_path, monkeypatch, capsys, fmt):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    _jsonl(tmp_path / "data" / "rows.jsonl", ROWS[fmt])

    assert main(["init", "mine", "--data", "data/rows.jsonl"]) == 0

    recipe = load_recipe(tmp_path / "mine.yaml")
    assert recipe.name == "mine" and recipe.data.format == fmt and recipe.data.path == "data/rows.jsonl"
    assert recipe.resolve(recipe.data.path) == tmp_path / "data" / "rows.jsonl"
    assert recipe.data.eval_size == 4  # a tenth of 30 rows, at least 4
    assert "30 rows" in (tmp_path / "mine.yaml").read_text() and "# detected from the rows" in (tmp_path / "mine.yaml").read_text()
    assert "next: edgesmith run mine.yaml --dry-run" in capsys.readouterr().out
    assert not list(tmp_path.glob(".mine.yaml.tmp*"))


def test_init_reads_csv_and_sizes_max_length_and_metric(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "qa.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "completion"])
        w.writeheader()
        for i in range(50):
            w.writerow({"prompt": "Explain " + "why " * 200, "completion": "because " * 30 + str(i)})
    assert main(["init", "qa", "--data", "qa.csv", "--out", "recipes/qa.yaml"]) == 0
    recipe = load_recipe(tmp_path / "recipes" / "qa.yaml")
    assert recipe.data.path == "../qa.csv" and recipe.data.format == "prompt_completion"
    assert recipe.data.max_length >= 1024 // 3  # ~1.1k characters a row: a few hundred tokens
    assert recipe.eval.metric == "contains"  # long answers


def test_init_targets_are_the_quickstarts():
    quick = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())["targets"]
    ours = [{"name": n, "format": f, "options": o, **({"runtimes": r} if r is not None else {})}
            for n, f, o, r, _ in QUICKSTART_TARGETS]
    assert ours == quick


def test_init_refuses_to_overwrite_and_names_bad_rows(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _jsonl(tmp_path / "rows.jsonl", ROWS["chat"])
    (tmp_path / "mine.yaml").write_text("mine")
    assert main(["init", "mine", "--data", "rows.jsonl"]) == 2
    assert "mine.yaml exists; nothing was written" in capsys.readouterr().err
    assert (tmp_path / "mine.yaml").read_text() == "mine"

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS["chat"]) + "\n{not json\n" + json.dumps({"question": "?"}) + "\n")
    assert main(["init", "other", "--data", "bad.jsonl"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and "bad.jsonl:3" in err and not (tmp_path / "other.yaml").exists()

    assert main(["init", "bad name", "--data", "rows.jsonl"]) == 2
    assert "NAME: must be letters" in capsys.readouterr().err
    assert main(["init", "x", "--data", "nowhere.jsonl"]) == 2
    assert "--data nowhere.jsonl: must be an existing data file" in capsys.readouterr().err
