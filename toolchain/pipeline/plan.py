"""How a recipe becomes a plan of stages: the stage table (``registry.STAGES``) walked in order.

A stage is a function from input artifacts to one output directory, plus the config its cache key
hashes. Each row of the stage table names a module whose ``plan(recipe, state)`` returns the stages
it adds (none when the recipe does not ask for it); ``state`` says what the rows before it planned,
in particular which stage holds **the model** later stages use: the base model, then whatever a
row marked ``produces_model`` planned (merge today; prune and DPO plug in the same way). A stage
body reads its inputs by role (``inputs["model"]``, ``inputs["base"]``, ``inputs["data"]``, ...), so
it never needs to know which stage made them. docs/architecture.md shows how to add a stage.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from toolchain.core.errors import EdgesmithError
from toolchain.pipeline.artifacts import Artifact
from toolchain.pipeline.recipe import Recipe

BASE = "model"  # the stage id of the base model


@dataclass
class Context:
    recipe: Recipe
    progress: bool = True
    resume: bool = False
    log: Callable[[str], None] = print


@dataclass
class Stage:
    id: str  # unique in the plan, names the output directory: "export-onnx-fp32"
    kind: str  # the stage table row's kind: data, model, train, merge, ..., export, bench, report
    inputs: list[str]  # ids of the stages it reads (their manifest hashes go into its cache key)
    config: dict  # hashed into the cache key
    run: Callable[[Context, dict[str, Artifact], Path], dict] = field(repr=False)
    summary: str = ""
    target: str | None = None  # the recipe target an export or bench stage belongs to
    roles: dict[str, str] = field(default_factory=dict)  # name the body reads -> stage id (default: the ids)
    versions: tuple[str, ...] = ()  # distributions whose versions shape the output (also in the cache key)
    # called with the artifact once it exists, made or cached (the model stage runs the targets' preflights)
    ready: Callable[[Context, Artifact], None] | None = field(default=None, repr=False)

    def role_map(self) -> dict[str, str]:
        return self.roles or {i: i for i in self.inputs}


class PlanState:
    """What the stage table's rows so far have planned."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.stages: list[Stage] = []
        self.model = BASE  # the stage whose output is the model later stages use

    def add(self, stage: Stage) -> None:
        if self.has(stage.id):
            raise EdgesmithError(f"two stages are named {stage.id!r}; target names must be unique")
        missing = [i for i in stage.inputs if not self.has(i)]
        if missing:  # a row of the stage table comes before what it reads: a bug in the table
            raise RuntimeError(f"stage {stage.id} reads {', '.join(missing)}, planned after it")
        self.stages.append(stage)

    def has(self, stage_id: str) -> bool:
        return any(s.id == stage_id for s in self.stages)

    def ids(self, kind: str | None = None) -> list[str]:
        return [s.id for s in self.stages if kind is None or s.kind == kind]

    def optional(self, *ids: str) -> list[str]:
        """Those of ``ids`` that are planned (e.g. ``data``, which a recipe without training lacks)."""
        return [i for i in ids if self.has(i)]

    def needs(self, what: str) -> bool:
        """Whether a target (or a stage section of the recipe) needs ``what``: calibration, imatrix."""
        from toolchain.pipeline.registry import STAGES, target_config

        if any(getattr(target_config(t), f"needs_{what}", False) for t in self.recipe.targets):
            return True
        return any(what in e.needs and getattr(self.recipe, e.section or "", None) is not None for e in STAGES)


def plan(recipe: Recipe) -> list[Stage]:
    """All stages of a recipe, in execution order."""
    from toolchain.pipeline.registry import STAGES

    state = PlanState(recipe)
    for entry in STAGES:
        added = entry.load()(recipe, state)
        for stage in added:
            stage.versions = tuple(dict.fromkeys((*entry.versions, *stage.versions)))
            state.add(stage)
        if entry.produces_model and added:
            state.model = added[-1].id
    return state.stages
