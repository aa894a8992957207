"""How the report writes numbers and values: one place for every section, the exporters' own included."""
from __future__ import annotations

import dataclasses
import math
from datetime import date, datetime
from typing import Any

DASH = "–"  # shown for missing, None, NaN and infinite values
SAMPLE_CHARS = 160  # a sample's text is cut to this many characters in the tables


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def fmt(x: Any, spec: str = ".1f") -> str:
    """A number formatted with spec; strings pass through; None/NaN/inf and others give '–'."""
    if isinstance(x, str):
        return x or DASH
    v = _num(x)
    return DASH if v is None else format(v, spec)


def fmt_pm(stat: Any, spec: str = ".1f") -> str:
    """'mean ± std' of a Stat dict (std left out when unknown)."""
    if not isinstance(stat, dict):
        return fmt(stat, spec)
    mean, std = _num(stat.get("mean")), _num(stat.get("std"))
    if mean is None:
        return DASH
    return format(mean, spec) + (f" ± {std:{spec}}" if std is not None else "")


def fmt_pct(x: Any) -> str:
    v = _num(x)
    return DASH if v is None else f"{100 * v:.1f}%"


def fmt_duration(seconds: Any) -> str:
    s = _num(seconds)
    if s is None:
        return DASH
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def fmt_count(n: Any) -> str:
    """Large counts readably: 134,515,008 -> '134.5 M'."""
    v = _num(n)
    if v is None:
        return DASH
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= size:
            return f"{v / size:.1f} {unit}"
    return f"{v:g}"


def fmt_value(x: Any) -> str:
    """A generic scalar: ints with separators, floats to 4 significant digits."""
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return fmt(x, ".4g")
    if isinstance(x, (list, tuple)):
        return ", ".join(fmt_value(v) for v in x) or DASH
    if isinstance(x, dict):
        return ", ".join(f"{k}={fmt_value(v)}" for k, v in x.items()) or DASH
    return DASH if x is None else str(x) or DASH


def _clip(text: Any, limit: int = SAMPLE_CHARS) -> str:
    s = " ".join(str(text if text is not None else "").split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


# ---------------------------------------------------------------- JSON

def jsonable(x: Any) -> Any:
    """x as plain JSON data: NaN/inf become None; dataclasses and to_dict() objects become dicts."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [jsonable(v) for v in x]
    if hasattr(x, "to_dict"):
        return jsonable(x.to_dict())
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return jsonable(dataclasses.asdict(x))
    if isinstance(x, (datetime, date)):
        return x.isoformat()
    return str(x)  # Path, numpy scalars' str, enums: readable rather than a crash
