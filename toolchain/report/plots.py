"""PNG plots for the run report: latency per target, training loss, task metric before/after.

Each function takes the report's data (plain dicts, as in report.json) and returns the PNG
bytes, or None when the data it needs is missing, so the report can skip the plot. The caller
writes the bytes (atomically) and embeds them in the HTML. matplotlib is imported inside the
functions with the Agg backend, so importing this module costs nothing and needs no display.
"""
from __future__ import annotations

import io
import math
from typing import Any

FIGSIZE = (7.0, 3.5)  # inches; small enough to embed several in one HTML page
DPI = 100
PREFILL_COLOR = "#4c72b0"
DECODE_COLOR = "#dd8452"
TTFT_COLOR = "#55a868"
# Above this max/min ratio the throughput axis switches to a log scale, so decode bars
# (often 10-30x slower than prefill on CPU) stay visible beside prefill bars.
LOG_SCALE_RATIO = 20.0


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finite(x: Any) -> float | None:
    """x as a float when it is a finite number, else None."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _stat(row: dict, key: str) -> tuple[float | None, float]:
    """(mean, std) of a Stat dict in a bench row; std is 0.0 when unknown."""
    s = row.get(key)
    if not isinstance(s, dict):
        return _finite(s), 0.0
    return _finite(s.get("mean")), _finite(s.get("std")) or 0.0


def _png(fig) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    try:
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    return buf.getvalue()


def row_label(row: dict) -> str:
    """How a bench row is named in plots and tables: target and runtime."""
    target, runtime = row.get("target") or "?", row.get("runtime")
    return f"{target} · {runtime}" if runtime else str(target)


def latency_png(bench: list[dict] | None) -> bytes | None:
    """Grouped horizontal bars of prefill and decode tok/s (± std) per row, plus TTFT ms."""
    rows = [r for r in (bench or []) if isinstance(r, dict)]
    series = []
    for r in rows:
        pre, dec, ttft = _stat(r, "prefill_tps"), _stat(r, "decode_tps"), _stat(r, "ttft_ms")
        if pre[0] is not None or dec[0] is not None or ttft[0] is not None:
            series.append((row_label(r), pre, dec, ttft))
    if not series:
        return None
    plt = _pyplot()
    n = len(series)
    height = max(FIGSIZE[1], 1.2 + 0.45 * n)
    fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(FIGSIZE[0], height), sharey=True,
                                   gridspec_kw={"width_ratios": [2.2, 1]})
    ys = list(range(n))
    bar_h = 0.38
    labels = [s[0] for s in series]
    rates = [v for s in series for v in (s[1][0], s[2][0]) if v and v > 0]
    log = bool(rates) and max(rates) / min(rates) > LOG_SCALE_RATIO
    for offset, idx, name, color in ((-bar_h / 2, 1, "prefill", PREFILL_COLOR),
                                     (bar_h / 2, 2, "decode", DECODE_COLOR)):
        means = [s[idx][0] or 0.0 for s in series]
        errs = [s[idx][1] if s[idx][0] is not None else 0.0 for s in series]
        bars = ax.barh([y + offset for y in ys], means, height=bar_h, xerr=errs, color=color,
                       label=name, capsize=2, error_kw={"elinewidth": 0.8})
        ax.bar_label(bars, labels=[f"{m:.0f}" if m else "" for m in means], padding=3, fontsize=7)
    if log:
        ax.set_xscale("log")
    ax.set_xlabel("tokens/s" + (" (log scale)" if log else ""), fontsize=8)
    ax.set_yticks(ys, labels, fontsize=8)
    ax.invert_yaxis()
    ax.margins(x=0.15)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("Throughput (mean ± std)", fontsize=9)
    ttft = [s[3][0] or 0.0 for s in series]
    ttft_err = [s[3][1] if s[3][0] is not None else 0.0 for s in series]
    bars = ax_t.barh(ys, ttft, height=0.6, xerr=ttft_err, color=TTFT_COLOR, capsize=2,
                     error_kw={"elinewidth": 0.8})
    ax_t.bar_label(bars, labels=[f"{m:.0f}" if m else "" for m in ttft], padding=3, fontsize=7)
    ax_t.margins(x=0.25)
    ax_t.set_xlabel("ms", fontsize=8)
    ax_t.set_title("Time to first token", fontsize=9)
    for a in (ax, ax_t):
        a.tick_params(labelsize=7)
        a.grid(axis="x", alpha=0.3)
    return _png(fig)


def _points(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, entry in enumerate(history):
        if not isinstance(entry, dict):
            continue
        y = _finite(entry.get(key))
        if y is None:
            continue
        x = _finite(entry.get("step"))
        xs.append(x if x is not None else float(i))
        ys.append(y)
    return xs, ys


def loss_png(log_history: list[dict] | None) -> bytes | None:
    """Train loss and eval loss against step (Hugging Face Trainer log_history entries)."""
    history = log_history or []
    train, evals = _points(history, "loss"), _points(history, "eval_loss")
    if not train[0] and not evals[0]:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    if train[0]:
        ax.plot(*train, color=PREFILL_COLOR, linewidth=1.2, label="train loss")
    if evals[0]:
        ax.plot(*evals, color=DECODE_COLOR, linewidth=1.2, marker="o", markersize=4,
                label="eval loss")
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("loss", fontsize=8)
    ax.set_title("Training loss", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.tick_params(labelsize=8)
    return _png(fig)


def task_png(task: dict | None) -> bytes | None:
    """Bars of the task metric before and after fine-tuning."""
    if not isinstance(task, dict):
        return None
    before, after = _finite(task.get("before")), _finite(task.get("after"))
    if before is None and after is None:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(FIGSIZE[0] * 0.6, FIGSIZE[1]))
    values = [before or 0.0, after or 0.0]
    bars = ax.bar(["before", "after"], values, color=[PREFILL_COLOR, TTFT_COLOR], width=0.55)
    ax.bar_label(bars, labels=[f"{v:.3g}" if v is not None else "–" for v in (before, after)],
                 padding=2, fontsize=8)
    metric = str(task.get("metric") or "metric")
    ax.set_ylabel(metric, fontsize=8)
    if all(0.0 <= v <= 1.0 for v in values):
        ax.set_ylim(0, 1.08)
    else:
        ax.margins(y=0.15)
    n = task.get("examples")
    ax.set_title(f"Task {metric}" + (f" ({n} examples)" if n else ""), fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.tick_params(labelsize=8)
    return _png(fig)


def importance_png(angular: list[float] | None, dropped=()) -> bytes | None:
    """Bars of each decoder block's importance (angular distance between its input and output on the
    calibration sample: low = the block changes little), the dropped blocks marked."""
    values = [_finite(a) for a in (angular or [])]
    if not values or all(v is None for v in values):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    dropped = set(dropped or ())
    colors = [TTFT_COLOR if i in dropped else PREFILL_COLOR for i in range(len(values))]
    ax.bar(range(len(values)), [v or 0.0 for v in values], color=colors, width=0.8)
    ax.set_xlabel("decoder layer", fontsize=8)
    ax.set_ylabel("angular distance in → out", fontsize=8)
    title = "Per-layer importance on the calibration sample"
    ax.set_title(title + (f" (dropped: {', '.join(str(i) for i in sorted(dropped))})" if dropped else ""), fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.tick_params(labelsize=8)
    return _png(fig)


def variants_png(points: list[dict] | None, goal: tuple[float, float] | None = None) -> bytes | None:
    """Each pruning variant on each target as a point: file size against dense (x) and decode speed
    against dense (y), dense at (1, 1); ``goal`` = (most size, least speed) shades the region that meets it."""
    pts = [p for p in (points or []) if _finite(p.get("size_ratio")) and _finite(p.get("decode_ratio"))]
    if not pts:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    targets = sorted({p["target"] for p in pts})
    marks = "osD^v<>"
    palette = [PREFILL_COLOR, DECODE_COLOR, TTFT_COLOR, "#c44e52", "#8172b3", "#937860"]
    variants = list(dict.fromkeys(p["variant"] for p in pts))
    for p in pts:
        ax.scatter(p["size_ratio"], p["decode_ratio"], s=42, color=palette[targets.index(p["target"]) % len(palette)],
                   marker=marks[variants.index(p["variant"]) % len(marks)])
    for t in targets:  # legend entries: colour = target, marker = variant
        ax.scatter([], [], color=palette[targets.index(t) % len(palette)], marker="o", label=t)
    for v in variants:
        ax.scatter([], [], color="#777777", marker=marks[variants.index(v) % len(marks)], label=v)
    xs = [p["size_ratio"] for p in pts] + [1.0]
    ys = [p["decode_ratio"] for p in pts] + [1.0]
    if goal:
        ax.fill_between([min(xs + [goal[0]]) - 0.05, goal[0]], goal[1], max(ys + [goal[1]]) + 0.1, color=TTFT_COLOR,
                        alpha=0.12, label=f"<= {goal[0]:.2f}x size, >= {goal[1]:.2f}x decode")
    ax.axhline(1.0, color="#999999", lw=0.8)
    ax.axvline(1.0, color="#999999", lw=0.8)
    ax.set_xlabel("file size / dense", fontsize=8)
    ax.set_ylabel("decode tok/s / dense", fontsize=8)
    ax.set_title("Pruning variants against dense (one sitting)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=7, loc="best", ncol=2)
    return _png(fig)
