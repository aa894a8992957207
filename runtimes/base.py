"""The runtime contract: load, prefill, decode; generation, quality and benchmarking on top.

A runtime implements three primitives on token ids:

- ``load()`` reads the artifact (timed as load time);
- ``prefill(ids, all_logits)`` runs the prompt and returns logits (``[len(ids), vocab]`` when
  ``all_logits`` else ``[1, vocab]`` for the last position) and an opaque state (the KV cache);
- ``decode(state, token)`` feeds one token and returns ``([1, vocab]`` logits, new state).

Everything else — greedy generation, the llama-bench-style benchmark and quality against the
reference — is shared here so every target is measured the same way.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from toolchain.core.benchschema import (  # noqa: F401
    BenchResult,
    BenchSettings,
    Quality,
    Stat,
    load_warning,
    machine_state,
    peak_rss_mb,
    rss_mb,
)
from toolchain.core.metrics import greedy_quality, log_softmax, quality_against  # noqa: F401 (the contract's)


def dir_size_mb(path) -> float:
    """Size of a file, a folder (recursively) or a list of them, in MiB."""
    if isinstance(path, (list, tuple)):
        return sum(dir_size_mb(p) for p in path)
    path = Path(path)
    if path.is_file():
        return path.stat().st_size / 2**20
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


class Runtime(ABC):
    """Base class for runtimes. Subclasses set ``name`` and implement the three primitives."""

    name: str = "runtime"

    def __init__(self, artifact_dir: str | Path, threads: int = 2, **options: Any):
        self.artifact_dir = Path(artifact_dir)
        self.threads = int(threads)
        self.options = options

    # -- primitives ---------------------------------------------------------------------------
    @abstractmethod
    def load(self) -> None: ...

    @abstractmethod
    def prefill(self, ids: Sequence[int], all_logits: bool = False) -> tuple[np.ndarray, Any]: ...

    @abstractmethod
    def decode(self, state: Any, token: int) -> tuple[np.ndarray, Any]: ...

    def artifact_files(self) -> Path:
        """What counts as the artifact's size on disk: a path or a list of paths (the directory by default)."""
        return self.artifact_dir

    # -- shared behaviour ---------------------------------------------------------------------
    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Next-token logits for every position of ``ids``: ``[len(ids), vocab]`` float32."""
        out, _ = self.prefill(ids, all_logits=True)
        return np.asarray(out, dtype=np.float32)

    def generate(self, ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = (),
                 on_token: Callable[[int], None] | None = None) -> list[int]:
        """Greedy generation. Stops after a stop id (which is included) or max_new_tokens."""
        if max_new_tokens <= 0:
            return []
        stop = set(int(s) for s in stop_ids)
        logits, state = self.prefill(ids)
        out: list[int] = []
        while True:
            tok = int(np.argmax(logits[-1]))
            out.append(tok)
            if on_token:
                on_token(tok)
            if tok in stop or len(out) >= max_new_tokens:
                return out
            logits, state = self.decode(state, tok)

    def _timed_run(self, ids: Sequence[int], gen_tokens: int) -> tuple[float, float, float]:
        """One benchmark repetition: (ttft seconds, prefill seconds, decode seconds for gen-1)."""
        t0 = time.perf_counter()
        logits, state = self.prefill(ids)
        tok = int(np.argmax(logits[-1]))
        t1 = time.perf_counter()
        for _ in range(gen_tokens - 1):
            logits, state = self.decode(state, tok)
            tok = int(np.argmax(logits[-1]))
        t2 = time.perf_counter()
        return t1 - t0, t1 - t0, t2 - t1

    def bench(self, prompt_ids: Sequence[int], settings: BenchSettings, target: str = "",
              load_s: float | None = None, rss_before_load: float | None = None) -> BenchResult:
        """llama-bench-style measurement: warm-up, then ``repetitions`` timed runs.

        Generation is forced to ``gen_tokens`` (no early stop) so every runtime decodes the same
        number of tokens; tokenisation is excluded because runtimes receive ids.
        """
        before = machine_state()
        if load_s is None:
            rss_before_load = rss_mb()
            t = time.perf_counter()
            self.load()
            load_s = time.perf_counter() - t
        ids = list(prompt_ids)[: settings.prompt_tokens]
        for _ in range(settings.warmup):
            self._timed_run(ids, min(settings.gen_tokens, 8))
        ttft, prefill_tps, decode_tps = [], [], []
        for _ in range(settings.repetitions):
            t_first, t_prefill, t_decode = self._timed_run(ids, settings.gen_tokens)
            ttft.append(t_first * 1000)
            prefill_tps.append(len(ids) / t_prefill)
            if settings.gen_tokens > 1:
                decode_tps.append((settings.gen_tokens - 1) / t_decode)
        warnings = [w for w in [load_warning(before, self.threads)] if w]
        after = machine_state(sample_s=0)
        return BenchResult(
            runtime=self.name, target=target, settings=settings, load_s=load_s,
            ttft_ms=Stat.of(ttft), prefill_tps=Stat.of(prefill_tps), decode_tps=Stat.of(decode_tps),
            peak_rss_mb=peak_rss_mb(), rss_before_load_mb=rss_before_load or float("nan"),
            artifact_mb=dir_size_mb(self.artifact_files()),
            machine={"before": before, "after": after, "threads": self.threads},
            warnings=warnings,
        )
