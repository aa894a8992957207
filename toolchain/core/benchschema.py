"""The one benchmark schema every runtime reports (docs/architecture.md, "One benchmark schema").

Measured like llama-bench: warm-up first, several repetitions, mean and spread reported,
tokenisation excluded from token rates (runtimes receive token ids, never text).
"""
from __future__ import annotations

import math
import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field


@dataclass
class BenchSettings:
    threads: int = 2
    prompt_tokens: int = 128
    gen_tokens: int = 64
    repetitions: int = 3
    warmup: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Stat:
    """Mean and spread of repeated measurements."""

    mean: float
    std: float
    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> "Stat":
        vals = [float(v) for v in values if v is not None and math.isfinite(v)]
        if not vals:
            nan = float("nan")
            return cls(nan, nan, nan, nan, nan, 0)
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return cls(statistics.fmean(vals), std, statistics.median(vals), min(vals), max(vals), len(vals))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Quality:
    """Quality of a target against the merged full-precision model (the reference)."""

    ppl: float  # perplexity of this target on the held-out text
    ref_ppl: float  # perplexity of the reference on the same tokens
    kl_mean: float  # mean KL(reference || target) of next-token distributions, nats
    kl_max: float
    top1_agreement: float  # fraction of positions whose argmax matches the reference
    greedy_match: float  # fraction of fixed prompts whose greedy output equals the reference's
    greedy_prefix: float  # mean fraction of the reference greedy tokens reproduced before divergence
    tokens: int  # tokens scored

    @property
    def ppl_delta(self) -> float:
        return self.ppl - self.ref_ppl

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ppl_delta"] = self.ppl_delta
        return d


@dataclass
class BenchResult:
    runtime: str
    target: str
    settings: BenchSettings
    load_s: float
    ttft_ms: Stat
    prefill_tps: Stat
    decode_tps: Stat
    peak_rss_mb: float
    rss_before_load_mb: float
    artifact_mb: float
    machine: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    quality: Quality | None = None

    def to_dict(self) -> dict:
        return {
            "runtime": self.runtime,
            "target": self.target,
            "settings": self.settings.to_dict(),
            "load_s": self.load_s,
            "ttft_ms": self.ttft_ms.to_dict(),
            "prefill_tps": self.prefill_tps.to_dict(),
            "decode_tps": self.decode_tps.to_dict(),
            "peak_rss_mb": self.peak_rss_mb,
            "rss_before_load_mb": self.rss_before_load_mb,
            "artifact_mb": self.artifact_mb,
            "machine": self.machine,
            "warnings": self.warnings,
            "quality": self.quality.to_dict() if self.quality else None,
        }


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies over all CPUs from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            parts = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return sum(parts) - idle, sum(parts)


def machine_state(sample_s: float = 0.5) -> dict:
    """Load and CPU facts recorded beside every measurement (llama.cpp collapses under load).

    ``busy_cores`` is what other processes used during a short idle sample taken right before
    the measurement; the load average lags by a minute and still counts the run's own previous
    stages, so it is recorded but not used for the warning.
    """
    try:
        load1, load5, _ = os.getloadavg()
    except OSError:
        load1 = load5 = float("nan")
    cpus = os.cpu_count() or 1
    busy = float("nan")
    a = _cpu_times()
    if a is not None and sample_s > 0:
        time.sleep(sample_s)
        b = _cpu_times()
        if b is not None and b[1] > a[1]:
            busy = (b[0] - a[0]) / (b[1] - a[1]) * cpus
    return {"cpus": cpus, "loadavg_1m": load1, "loadavg_5m": load5, "busy_cores": busy}


def load_warning(before: dict, threads: int) -> str | None:
    """A warning when other work competed for the cores while the benchmark started."""
    cpus = before.get("cpus") or 1
    busy = before.get("busy_cores", float("nan"))
    if math.isfinite(busy) and busy > max(0.3, cpus - threads + 0.3):
        return (f"other processes kept {busy:.2f} of {cpus} CPUs busy when the benchmark started "
                f"({threads} threads asked for): figures may be depressed by contention")
    return None


def rss_mb() -> float:
    """Current resident set size of this process in MiB."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize() / 2**20
    except OSError:
        return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB.

    Read from VmHWM, which exec resets; ru_maxrss would carry over the high-water mark of the
    parent that forked the benchmark worker and report the parent's peak instead.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
