"""The README's commands stay true: CI runs exactly its test command, and its recipe reference
names every recipe key."""
from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

from toolchain.pipeline.recipe import Recipe

REPO = Path(__file__).resolve().parent.parent


def bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    commands = [b for b in bash_blocks(readme) if "pytest" in b]
    assert len(commands) == 1, "README must hold exactly one test command"
    ci = (REPO / ".ci" / "run").read_text()
    assert commands[0] in ci.splitlines()


def test_quickstart_command_runs_the_quickstart_recipe():
    readme = (REPO / "README.md").read_text()
    quick = [b for b in bash_blocks(readme) if "edgesmith run examples/quickstart.yaml" in b]
    assert quick and (REPO / "examples" / "quickstart.yaml").exists()


def test_recipe_reference_names_every_key():
    readme = (REPO / "README.md").read_text()
    def keys(cls):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init:  # set by load_recipe, not a recipe key
                continue
            yield f.name
            tp = hints[f.name]
            args = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)] or [tp]
            for a in args:
                if dataclasses.is_dataclass(a):
                    yield from keys(a)
    missing = [k for k in keys(Recipe) if not re.search(rf"^\s*{k}:", readme, flags=re.M)]
    assert not missing, f"README recipe reference lacks: {missing}"
