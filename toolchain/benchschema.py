"""The one benchmark schema every runtime reports (DESIGN.md, "One benchmark schema").

Measured like llama-bench: warm-up first, several repetitions, mean and spread reported,
tokenisation excluded from token rates (runtimes receive token ids, never text).
"""
from __future__ import annotations

import math
import os
import statistics
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


def machine_state() -> dict:
    """Load and CPU facts recorded beside every measurement (llama.cpp collapses under load)."""
    try:
        load1, load5, _ = os.getloadavg()
    except OSError:
        load1 = load5 = float("nan")
    return {"cpus": os.cpu_count(), "loadavg_1m": load1, "loadavg_5m": load5}


def load_warning(before: dict, threads: int) -> str | None:
    """A warning when other work competes for the cores the benchmark uses."""
    cpus = before.get("cpus") or 1
    load = before.get("loadavg_1m", 0.0)
    if math.isfinite(load) and load > max(0.5, cpus - threads + 0.5):
        return (f"machine load was {load:.2f} on {cpus} CPUs when the benchmark started "
                f"({threads} threads asked for): figures may be depressed by contention")
    return None
