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
from toolchain.core import dist
from toolchain.core.errors import EdgesmithError, StageError, StageFailed, one_line
from toolchain.core.files import symlink_atomic, write_json_atomic, write_text_atomic
from toolchain.pipeline.artifacts import Artifact, ArtifactStore, fingerprint_path, stage_key
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
        """Run or reuse each stage in order. Under a launcher (``torchrun``, ``accelerate launch``: several
        ranks), see :meth:`_execute_ranks`."""
        if dist.is_distributed():
            return self._execute_ranks(stages, force)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        arts: dict[str, Artifact] = {}
        steps: list[Step] = []
        t_run = self._start()
        for n, s in enumerate(stages, 1):
            self._stage(n, len(stages), s, arts, steps, force)
        self._write_index(steps, time.perf_counter() - t_run)
        return steps

    def _start(self) -> float:
        t_run = time.perf_counter()
        self.ctx.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.ctx.started_perf = t_run
        return t_run

    def _stage(self, n: int, total: int, s: Stage, arts: dict[str, Artifact], steps: list[Step],
               force: set[str], plan_only: bool = False) -> Path | None:
        """Reuse stage ``s`` or run it into its ``.partial`` folder and commit it. ``plan_only``: stop after
        preparing the ``.partial`` folder and return it (None when the stage is cached)."""
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
            return None
        self.ctx.log(f"[{n}/{total}] {s.id}: {s.summary} ...")
        partial = self.store.partial_path(s.id, key)
        if partial.exists() and not (self.ctx.resume and s.kind == "train"):
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
        if plan_only:
            return partial
        self._run_body(n, total, s, inputs, hashes, key, partial, arts, steps)
        return partial

    def _run_body(self, n, total, s: Stage, inputs, hashes, key, partial: Path, arts, steps, commit: bool = True):
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
        if not commit:
            return
        art = self.store.commit(s.id, s.kind, key, s.config, hashes, figures or {}, wall)
        arts[s.id] = art
        steps.append(Step(s, key, "run", wall_s=wall))
        if s.ready:
            s.ready(self.ctx, art)
        self.ctx.log(f"[{n}/{total}] {s.id}: done in {wall:.1f}s -> {art.path}")

    def _execute_ranks(self, stages: list[Stage], force: set[str]) -> list[Step]:
        """Several ranks. Rank 0 runs the stages before training and writes their artifacts while the others
        wait; every rank then trains (the Trainer's DDP, FSDP or DeepSpeed) into rank 0's ``.partial``
        folder, where only rank 0 writes the result and commits it; the other ranks stop there and rank 0
        runs the rest alone. Rank 0 tells the others whether training runs at all (cached, forced, failed),
        so every rank decides alike. The run folder must be one every rank sees (a shared filesystem when
        the ranks are on several machines)."""
        first = next((i for i, s in enumerate(stages) if s.kind == "train"), None)
        main, me = dist.is_main(), dist.rank()
        if first is None:  # nothing to train together: rank 0 runs the plan alone
            if not main:
                print(f"edgesmith rank {me}: these stages train nothing; rank 0 runs them alone")
                return []
            dist.leave()
            return self.execute(stages, force)
        if not main:
            self.ctx.log, self.ctx.progress = (lambda _msg: None), False  # logs and bars come from rank 0 only
        before, train, after = stages[:first], stages[first], stages[first + 1:]
        arts: dict[str, Artifact] = {}
        steps: list[Step] = []
        t_run = self._start()
        total = len(stages)
        partial = None
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            try:
                for n, s in enumerate(before, 1):
                    self._stage(n, total, s, arts, steps, force)
                partial = self._stage(first + 1, total, train, arts, steps, force, plan_only=True)
            except BaseException as exc:
                dist.share({"failed": f"{type(exc).__name__}: {one_line(exc) or '(no message)'}"})
                raise
            dist.share({"train": "run" if partial else "cached", "world_size": dist.world_size()})
        else:
            told = dist.share()
            if "failed" in told:
                raise EdgesmithError(f"rank {me}: rank 0 failed before training ({told['failed']}); see its output")
            for s in before:  # rank 0's artifacts, by the same keys
                arts[s.id] = self._artifact_of(s, arts)
            if told["train"] == "cached":
                print(f"edgesmith rank {me}: stage {train.id} is cached; rank 0 continues")
                dist.leave()
                return []
            partial = self.store.partial_path(train.id, self.key(train, {i: arts[i].hash for i in train.inputs}))
        if partial is not None:  # every rank trains; rank 0 alone writes the result and commits it
            hashes = {i: arts[i].hash for i in train.inputs}
            inputs = {role: arts[sid] for role, sid in train.role_map().items()}
            key = self.key(train, hashes)
            self._run_body(first + 1, total, train, inputs, hashes, key, partial, arts, steps, commit=main)
            dist.barrier()  # rank 0 has committed the adapter
            if not main:
                print(f"edgesmith rank {me}: training done; rank 0 continues")
                dist.leave()
                return []
        dist.leave()  # what follows is rank 0's alone, a single process
        for n, s in enumerate(after, first + 2):
            self._stage(n, total, s, arts, steps, force)
        self._write_index(steps, time.perf_counter() - t_run)
        return steps

    def _artifact_of(self, s: Stage, arts: dict[str, Artifact]) -> Artifact:
        """The artifact rank 0 made or reused for ``s`` (another rank reads it, never writes)."""
        key = self.key(s, {i: arts[i].hash for i in s.inputs})
        art = self.store.lookup(s.id, key)
        if art is None:
            raise EdgesmithError(
                f"rank {dist.rank()}: rank 0's artifact {self.store.path_for(s.id, key)} is not visible here; "
                "every rank must see the run folder (fix: on several machines, put output_dir on a shared "
                "filesystem and give every machine the same recipe, data and model paths)")
        return art

    @staticmethod
    def key(stage: Stage, input_hashes: dict[str, str]) -> str:
        """The cache key: kind, config, inputs, and the versions of edgesmith and of the libraries that
        shape this stage's output (an upgrade re-runs what it may change)."""
        versions = {"edgesmith": __version__, **distribution_versions(stage.versions)}
        return stage_key(stage.kind, _launch_config(stage), input_hashes, versions)

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


def _launch_config(stage: Stage) -> dict:
    """A stage's config for its key. Training under a launcher adds what changes its result beyond the recipe:
    the number of ranks (the global batch is batch_size x grad_accum x ranks) and the contents of the FSDP or
    DeepSpeed config file it names. One process adds nothing, so its keys are those of a plain run."""
    if stage.kind != "train":
        return stage.config
    launch = {}
    if dist.world_size() > 1:
        launch["world_size"] = dist.world_size()
    train = stage.config.get("train") or {}
    for name in ("fsdp", "deepspeed"):
        if train.get(name) and Path(train[name]).is_file():
            launch[name] = fingerprint_path(Path(train[name]))
    return {**stage.config, "launch": launch} if launch else stage.config
