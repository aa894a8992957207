"""User-facing errors.

Every error a user can cause names the place (file, line, key), the rule, the value received and
the fix. They are raised, never asserted, and the CLI prints them without a traceback.
"""
from __future__ import annotations

from dataclasses import dataclass

NO_VALUE = object()  # a Problem whose rule already quotes the value


@dataclass(frozen=True)
class Problem:
    """One thing wrong with user input."""

    where: str  # "recipe.yaml: train.lora.rank" or "data.jsonl:17"
    rule: str  # "must be a positive integer"
    value: object = None
    fix: str = ""

    def __str__(self) -> str:
        text = f"{self.where}: {self.rule}"
        if self.value is not NO_VALUE:
            text += f", got {self.value!r}"
        if self.fix:
            text += f" (fix: {self.fix})"
        return text


class EdgesmithError(Exception):
    """Base class for errors the CLI reports as a clean message (exit code 2)."""


class UserInputError(EdgesmithError):
    """One or more problems with a recipe, dataset or command line, reported all at once."""

    def __init__(self, title: str, problems: list[Problem]):
        self.title = title
        self.problems = list(problems)
        lines = [f"{title} ({len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}):"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class RecipeError(UserInputError):
    """The recipe failed validation."""


class DataError(UserInputError):
    """The dataset has rows that cannot be used."""


class ModelSourceError(EdgesmithError):
    """The model source cannot be resolved (missing file, offline hub, unsupported format)."""


class StageError(EdgesmithError):
    """A stage failed in a way the user should see plainly (e.g. non-finite merged weights); ``log``: a file
    holding the whole story (a worker's output), when there is one."""

    def __init__(self, message: str, log=None):
        super().__init__(message)
        self.log = log


class StageFailed(EdgesmithError):
    """A stage of a run failed: the stage, the cause in one line, and the log file with the full traceback
    (what the CLI prints instead of a traceback; exit code 4)."""

    def __init__(self, stage: str, cause: str, log):
        self.stage, self.cause, self.log = stage, cause, log
        super().__init__(f"stage {stage} failed: {cause}\n  full log: {log}")


def one_line(text: str, limit: int = 400) -> str:
    """The first non-empty line of ``text`` (a cause fit for one terminal line), shortened to ``limit``."""
    line = next((s.strip() for s in str(text).splitlines() if s.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


class PreflightError(EdgesmithError):
    """An exporter or runtime cannot handle this model or setting; raised before any work."""
