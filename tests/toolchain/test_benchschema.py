"""The benchmark schema's statistics and the contention warning."""
from __future__ import annotations

import math

from toolchain.core.benchschema import Stat, load_warning, machine_state


def test_stat_of_repetitions():
    s = Stat.of([10.0, 12.0, 14.0, float("nan")])
    assert (s.mean, s.median, s.min, s.max, s.n) == (12.0, 12.0, 10.0, 14.0, 3)
    assert math.isclose(s.std, 2.0)
    assert Stat.of([]).n == 0


def test_contention_warning_uses_cores_busy_elsewhere():
    # 2 threads on 2 CPUs: any other busy core competes; the load average alone does not warn,
    # since it lags a minute and counts the run's own previous stages
    assert load_warning({"cpus": 2, "busy_cores": 1.2, "loadavg_1m": 0.1}, threads=2)
    assert load_warning({"cpus": 2, "busy_cores": 0.05, "loadavg_1m": 3.0}, threads=2) is None
    assert load_warning({"cpus": 8, "busy_cores": 1.0}, threads=2) is None  # spare cores left


def test_machine_state_samples_cpu_use():
    m = machine_state(sample_s=0.2)
    assert m["cpus"] >= 1 and 0.0 <= m["busy_cores"] <= m["cpus"] + 1e-6
