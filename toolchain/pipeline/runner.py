"""Runs a plan of stages through the artifact cache.

For each stage in order: compute its key from (kind, config, input manifest hashes); if an
artifact with that key is whole, reuse it; else run the stage into ``<dir>.partial`` and rename
it into place. ``--dry-run`` prints the same decisions without running anything.
"""
from __future__ import annotations

import os
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from toolchain import __version__
from toolchain.core.errors import EdgesmithError, StageError, StageFailed, one_line
from toolchain.core.files import symlink_atomic, write_json_atomic, write_text_atomic
from toolchain.pipeline.artifacts import Artifact, ArtifactStore, stage_key
from toolchain.pipeline.plan import Context, Stage, plan
from toolchain.pipeline.registry import distribution_versions


@dataclass
class Step:
    stage: Stage
    key: str | None  # None when an input will change (unknown until it runs)
    status: str  # "cached" | "run"
    reason: str = ""
    wall_s: float = 0.0


def select(stages: list[Stage], until: str | None = None, only: list[str] | None = None) -> list[Stage]:
    """Stages needed to produce ``until`` (a kind or id) or the ``only`` ids, with their inputs."""
    if until is None and not only:
        return stages
    by_id = {s.id: s for s in stages}
    wanted = set(only or [])
    if until:
        wanted |= {s.id for s in stages if s.kind == until or s.id == until}
        if not wanted:
            raise EdgesmithError(f"the recipe has no {until!r} stage (stages: {', '.join(by_id)})")
    needed: set[str] = set()
    def add(sid: str):
        if sid not in needed:
            needed.add(sid)
            for dep in by_id[sid].inputs:
                add(dep)
    for sid in wanted:
        add(sid)
    return [s for s in stages if s.id in needed]


class Runner:
    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.run_dir = ctx.recipe.run_dir()
        self.store = ArtifactStore(self.run_dir)
        self.stages = plan(ctx.recipe)

    def decide(self, stages: list[Stage], force: set[str] = frozenset()) -> list[Step]:
        """What would happen: cached or run, with keys where they can be known in advance."""
        hashes: dict[str, str | None] = {}
        steps = []
        for s in stages:
            inputs = {i: hashes.get(i) for i in s.inputs}
            if any(h is None for h in inputs.values()):
                steps.append(Step(s, None, "run", "an input will be rebuilt"))
                hashes[s.id] = None
                continue
            key = self.key(s, inputs)
            art = self.store.lookup(s.id, key)
            if art is not None and not (s.id in force or s.kind in force):
                steps.append(Step(s, key, "cached"))
                hashes[s.id] = art.hash
            else:
                reason = "forced" if art is not None else "no artifact for this config and inputs"
                steps.append(Step(s, key, "run", reason))
                hashes[s.id] = None
        return steps

    def execute(self, stages: list[Stage], force: set[str] = frozenset()) -> list[Step]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        arts: dict[str, Artifact] = {}
        steps: list[Step] = []
        total = len(stages)
        t_run = time.perf_counter()
        self.ctx.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.ctx.started_perf = t_run
        for n, s in enumerate(stages, 1):
            hashes = {i: arts[i].hash for i in s.inputs}
            inputs = {role: arts[sid] for role, sid in s.role_map().items()}  # what the body reads, by role
            key = self.key(s, hashes)
            art = self.store.lookup(s.id, key)
            if art is not None and not (s.id in force or s.kind in force):
                self.store.link(s.id, art.path)
                self.ctx.log(f"[{n}/{total}] {s.id}: cached ({art.path.name})")
                arts[s.id] = art
                steps.append(Step(s, key, "cached"))
                if s.ready:
                    s.ready(self.ctx, art)
                continue
            self.ctx.log(f"[{n}/{total}] {s.id}: {s.summary} ...")
            partial = self.store.partial_path(s.id, key)
            if partial.exists() and not (self.ctx.resume and s.kind == "train"):
                shutil.rmtree(partial)
            partial.mkdir(parents=True, exist_ok=True)
            t = time.perf_counter()
            try:
                if s.kind == "report":
                    self.ctx.steps = steps  # the report lists what ran and what was cached
                figures = s.run(self.ctx, inputs, partial)
            except StageError as exc:
                raise StageFailed(s.id, one_line(exc), self._failure_log(s.id, exc)) from exc
            except EdgesmithError:
                raise  # the user's input: its message names the place and the fix
            except Exception as exc:
                cause = f"{type(exc).__name__}: {one_line(exc) or '(no message)'}"
                raise StageFailed(s.id, cause, self._failure_log(s.id, exc)) from exc
            wall = time.perf_counter() - t
            art = self.store.commit(s.id, s.kind, key, s.config, hashes, figures or {}, wall)
            arts[s.id] = art
            steps.append(Step(s, key, "run", wall_s=wall))
            if s.ready:
                s.ready(self.ctx, art)
            self.ctx.log(f"[{n}/{total}] {s.id}: done in {wall:.1f}s -> {art.path}")
        self._write_index(steps, time.perf_counter() - t_run)
        return steps

    @staticmethod
    def key(stage: Stage, input_hashes: dict[str, str]) -> str:
        """The cache key: kind, config, inputs, and the versions of edgesmith and of the libraries that
        shape this stage's output (an upgrade re-runs what it may change)."""
        versions = {"edgesmith": __version__, **distribution_versions(stage.versions)}
        return stage_key(stage.kind, stage.config, input_hashes, versions)

    def _failure_log(self, stage_id: str, exc: BaseException) -> Path:
        """``<run_dir>/logs/<stage>.log``: the traceback, and the worker's own output when it ran one.
        Kept outside the stage's .partial folder, which the next run clears."""
        log = self.run_dir / "logs" / f"{stage_id}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        text = f"stage {stage_id} failed at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n\n"
        text += "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        worker = getattr(exc, "log", None)
        if worker and Path(worker).is_file():
            text += f"\n--- {worker} ---\n" + Path(worker).read_text(errors="replace")
        write_text_atomic(log, text)
        return log

    def _write_index(self, steps: list[Step], wall: float) -> None:
        write_json_atomic(self.run_dir / "run.json", {
            "recipe": str(self.ctx.recipe.recipe_path), "wall_s": wall,
            "stages": [{"stage": st.stage.id, "key": st.key, "status": st.status, "wall_s": st.wall_s}
                       for st in steps]})
        for name in ("report.html", "report.md", "report.json"):
            src = self.run_dir / "report" / name
            if src.exists():
                _link_file(self.run_dir / name, src)


def _link_file(link: Path, target: Path) -> None:
    symlink_atomic(link, os.path.relpath(target, link.parent))
