"""Generate the quickstart task: normalise a date written in many styles to ISO 8601.

A real, checkable task: each answer is exactly one string (YYYY-MM-DD), so exact match is the
metric. The base SmolLM2-135M-Instruct answers chattily or with the wrong date; a short LoRA
fine-tune teaches it the format and the month/day mapping.

    python examples/data/make_dates.py > examples/data/dates.jsonl
"""
from __future__ import annotations

import json
import random
import sys
from datetime import date, timedelta

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]


def ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


STYLES = [
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"{MONTHS[d.month - 1][:3]} {d.day} {d.year}",
    lambda d: f"{ordinal(d.day)} of {MONTHS[d.month - 1]}, {d.year}",
    lambda d: f"{d.day:02d}.{d.month:02d}.{d.year}",
    lambda d: f"{d.year}/{d.month:02d}/{d.day:02d}",
    lambda d: f"{MONTHS[d.month - 1]} {ordinal(d.day)} {d.year}",
    lambda d: f"{d.day}-{MONTHS[d.month - 1][:3]}-{d.year}",
]

PROMPTS = [
    "Convert this date to ISO 8601 (YYYY-MM-DD): {}",
    "Write {} as YYYY-MM-DD.",
    "ISO date for: {}",
]


def rows(n: int, seed: int = 7):
    rng = random.Random(seed)
    start, span = date(1950, 1, 1), (date(2049, 12, 31) - date(1950, 1, 1)).days
    for _ in range(n):
        d = start + timedelta(days=rng.randrange(span))
        text = rng.choice(STYLES)(d)
        prompt = rng.choice(PROMPTS).format(text)
        yield {"messages": [{"role": "user", "content": prompt},
                            {"role": "assistant", "content": d.isoformat()}]}


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 480
    for row in rows(n):
        sys.stdout.write(json.dumps(row) + "\n")
