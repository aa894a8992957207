"""The dataset: read rows from a file, check and normalise them, split train / eval.

Four row formats are accepted and normalised to one of two shapes:

    chat               {"messages": [{"role": ..., "content": ...}, ...]}  -> messages
    instruction        {"instruction", "input" (optional), "output"}         -> messages
    prompt_completion  {"prompt", "completion"}                              -> messages
    text               {"text"}                                              -> {"text": ...}

Every bad row is reported with its file and line (or row number), the rule it breaks, the value
received and the fix, all rows at once; or, with ``bad_rows: skip``, dropped and counted by
reason. Tokenisation lives in ``toolchain.core.chat`` and is re-exported here.
"""
from __future__ import annotations

import csv
import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from toolchain.core.errors import NO_VALUE, DataError, Problem

FORMATS = ("chat", "instruction", "prompt_completion", "text")
ROLES = ("system", "user", "assistant", "tool")
SUPPORTED = ".jsonl, .json (JSON Lines or a JSON array), .csv, .parquet, or a datasets.save_to_disk directory"
MAX_LISTED = 20  # bad rows listed in one DataError; the rest are counted
VALUE_CHARS = 80  # a bad row's value is shown cut to this many characters


@dataclass(frozen=True)
class Unreadable:
    """Yielded by read_rows in place of a row that could not be parsed at all."""

    rule: str  # "is not valid JSON"
    detail: str  # the parser's message
    fix: str = ""


class RowError(ValueError):
    """A row breaks a rule; ``str()`` is the rule, which names the field."""

    def __init__(self, rule: str, value: object = None, fix: str = ""):
        super().__init__(rule)
        self.rule, self.value, self.fix = rule, value, fix

    @property
    def reason(self) -> str:
        """The rule with indices generalised, for counting skipped rows by kind."""
        return re.sub(r"\[\d+\]", "[i]", self.rule)


# ----------------------------------------------------------------------------- reading

def read_rows(path: Path) -> Iterator[tuple[str, object]]:
    """Yield (location, row) for every row of a data file; unparseable rows yield an Unreadable."""
    path = Path(path)
    if path.is_dir():
        yield from _read_saved_dataset(path)
        return
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        yield from _read_json(path)
    elif suffix == ".csv":
        yield from _read_csv(path)
    elif suffix == ".parquet":
        yield from _read_parquet(path)
    else:
        raise DataError(f"cannot read {path}", [Problem(str(path), f"must be one of: {SUPPORTED}", suffix or path.name,
                                                        "convert the data to JSON Lines (one object per line)")])


def _read_json(path: Path) -> Iterator[tuple[str, object]]:
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            yield f"{path.name}:{exc.lineno}", Unreadable("is not valid JSON", exc.msg, "fix the JSON syntax there")
            return
        for i, item in enumerate(items, 1):
            yield f"{path.name} item {i}", item
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{path.name}:{number}", json.loads(line)
        except json.JSONDecodeError as exc:
            yield f"{path.name}:{number}", Unreadable("is not valid JSON", f"{exc.msg} (column {exc.colno})",
                                                      "write one complete JSON object per line")


def _read_csv(path: Path) -> Iterator[tuple[str, object]]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return
        last_line = reader.line_num
        for values in reader:
            where, last_line = f"{path.name}:{last_line + 1}", reader.line_num
            if not values or all(not v.strip() for v in values):
                continue
            if len(values) != len(header):
                yield where, Unreadable(f"has {len(values)} fields but the header has {len(header)}", ",".join(values),
                                        "quote fields that contain commas or newlines")
                continue
            yield where, dict(zip(header, values))


def _read_parquet(path: Path) -> Iterator[tuple[str, object]]:
    import pyarrow.parquet as pq

    number = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            number += 1
            yield f"{path.name} row {number}", row


def _read_saved_dataset(path: Path) -> Iterator[tuple[str, object]]:
    is_dict = (path / "dataset_dict.json").is_file()
    if not is_dict and not ((path / "dataset_info.json").is_file() or (path / "state.json").is_file()):
        raise DataError(f"cannot read {path}", [Problem(str(path), "a directory must be a datasets.save_to_disk folder "
                                                        "(with dataset_info.json / state.json)", path.name,
                                                        f"or point data.path at a file: {SUPPORTED}")])
    try:
        from datasets import load_from_disk
    except ImportError:
        raise DataError(f"cannot read {path}", [Problem(str(path), "reading a saved dataset needs the `datasets` package",
                                                        path.name, "pip install 'edgesmith[data]'")]) from None
    ds = load_from_disk(str(path))
    if is_dict or hasattr(ds, "keys"):
        splits = list(ds.keys())
        if "train" not in splits:
            raise DataError(f"cannot read {path}", [Problem(str(path), "a DatasetDict must have a 'train' split", splits,
                                                            f"point data.path at one split's folder, e.g. {path / splits[0]}"
                                                            if splits else "save a dataset with rows")])
        ds, where = ds["train"], f"{path.name}/train"
    else:
        where = path.name
    for number, row in enumerate(ds, 1):
        yield f"{where} row {number}", row


# ----------------------------------------------------------------------------- rows

def detect_format(row: dict) -> str | None:
    """The format a row's keys say it is in, or None."""
    if not isinstance(row, dict):
        return None
    if "messages" in row:
        return "chat"
    if "instruction" in row and "output" in row:
        return "instruction"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "text" in row:
        return "text"
    return None


def normalize(row: object, fmt: str, system_prompt: str | None = None) -> dict:
    """The row as {"messages": [...]} or {"text": ...}; raise RowError (a ValueError) if it is bad."""
    if not isinstance(row, dict):
        raise RowError("must be a JSON object", _short(row), 'write {"messages": [...]} or another supported format')
    if fmt == "text":
        return {"text": _text_field(row, "text")}
    if fmt == "chat":
        messages = _chat_messages(row)
    elif fmt == "instruction":
        user = _text_field(row, "instruction")
        extra = row.get("input")
        if extra is not None and not isinstance(extra, str):
            raise RowError("`input` must be a string", _short(extra), "write the input as text or leave it out")
        if extra and extra.strip():
            user += "\n\n" + extra
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _text_field(row, "output")}]
    elif fmt == "prompt_completion":
        messages = [{"role": "user", "content": _text_field(row, "prompt")},
                    {"role": "assistant", "content": _text_field(row, "completion")}]
    else:
        raise ValueError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return {"messages": messages}


def _text_field(row: dict, key: str) -> str:
    if key not in row or row[key] is None:
        raise RowError(f"`{key}` is missing", _short(row), f"add a non-empty `{key}` string")
    value = row[key]
    if not isinstance(value, str):
        raise RowError(f"`{key}` must be a string", _short(value), f"write `{key}` as text")
    if not value.strip():
        raise RowError(f"`{key}` must not be empty", value, f"write a non-empty `{key}` or drop the row")
    return value


def _chat_messages(row: dict) -> list[dict]:
    messages = row.get("messages")
    if isinstance(messages, str):  # CSV cells hold the list as JSON text
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as exc:
            raise RowError("`messages` text is not valid JSON", f"{exc.msg}: {_short(messages)}",
                           "write messages as a JSON list of {role, content} objects") from None
    if messages is None:
        raise RowError("`messages` is missing", _short(row), "add a list of {role, content} messages")
    if not isinstance(messages, list) or not messages:
        raise RowError("`messages` must be a non-empty list", _short(messages), "write a list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RowError(f"messages[{i}] must be an object with role and content", _short(m),
                           'write {"role": "user", "content": "..."}')
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise RowError(f"messages[{i}].role must be one of {', '.join(ROLES)}", role, "fix the role name")
        if role == "system" and i > 0:
            raise RowError(f"messages[{i}] is a system message after the first message", _short(content),
                           "put the system message first")
        if not isinstance(content, str):
            raise RowError(f"messages[{i}].content must be a string", _short(content), "write the content as text")
        if role in ("user", "assistant") and not content.strip():
            raise RowError(f"messages[{i}].content must not be empty ({role})", content, "write the message or drop the row")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise RowError("`messages` has no assistant message", _short(messages), "add the reply to learn as an assistant message")
    if out[-1]["role"] != "assistant":
        raise RowError(f"the last message must be from the assistant, not the {out[-1]['role']}", _short(out[-1]["content"]),
                       "end each conversation with the assistant reply to learn (or drop the trailing turn)")
    return out


def _short(value: object) -> object:
    """A value cut down for an error message."""
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= VALUE_CHARS else text[:VALUE_CHARS - 3] + "..."


# ----------------------------------------------------------------------------- loading and splitting

@dataclass
class FileResult:
    path: Path
    examples: list[dict]
    rows_read: int
    fmt: str | None
    problems: list[Problem]
    skipped: Counter


def load_file(path: Path, fmt: str, system_prompt: str | None) -> FileResult:
    """Read and normalise one file; bad rows become Problems (nothing is raised for them)."""
    examples, problems, skipped = [], [], Counter()
    rows_read, file_fmt, fmt_where = 0, None if fmt == "auto" else fmt, None
    for where, row in read_rows(path):
        rows_read += 1
        try:
            if isinstance(row, Unreadable):
                raise RowError(row.rule, row.detail, row.fix)
            if file_fmt is None or fmt == "auto":
                found = detect_format(row)
                if found is None:
                    keys = sorted(row) if isinstance(row, dict) else _short(row)
                    raise RowError("has no recognised format (needs `messages`, `instruction` + `output`, "
                                   "`prompt` + `completion`, or `text`)", keys, "rename the columns or set data.format")
                if file_fmt is None:
                    file_fmt, fmt_where = found, where
                elif found != file_fmt:
                    raise RowError(f"is in {found} format but the file is {file_fmt} (from {fmt_where})", sorted(row),
                                   "use one format per file")
            examples.append(normalize(row, file_fmt, system_prompt))
        except RowError as exc:
            problems.append(Problem(where, exc.rule, exc.value, exc.fix))
            skipped[exc.reason] += 1
    return FileResult(path, examples, rows_read, file_fmt, problems, skipped)


def bad_rows_error(results: list[FileResult]) -> DataError:
    bad = [r for r in results if r.problems]
    total = sum(len(r.problems) for r in bad)
    problems = [p for r in bad for p in r.problems]
    listed = problems[:MAX_LISTED]
    if total > MAX_LISTED:
        listed.append(Problem(" and ".join(r.path.name for r in bad), f"{total - MAX_LISTED} more bad rows not listed",
                              NO_VALUE, "fix the rows above and re-run to see the rest, or set data.bad_rows: skip"))
    paths = " and ".join(str(r.path) for r in bad)
    return DataError(f"{paths} {'has' if len(bad) == 1 else 'have'} {total} bad row{'s' if total != 1 else ''}", listed)


def _eval_count(n: int, eval_size: float) -> int:
    """Rows split off for eval: a fraction (<1) or a count (>=1); 0 means none; at least 1 if n >= 2."""
    if eval_size <= 0 or n < 2:
        return 0
    k = round(n * eval_size) if eval_size < 1 else int(eval_size)
    return min(max(k, 1), n - 1)


def load_splits(cfg, base_dir: Path) -> tuple[list[dict], list[dict], dict]:
    """Read, check, normalise, shuffle and split the data of a DataSection.

    Returns (train, eval, stats). The shuffle uses ``cfg.seed`` and is deterministic;
    ``max_rows`` keeps the first N rows after shuffling (of the training file when an
    eval file is given). Without ``eval_path``, eval rows are the first ``eval_size``
    rows of the shuffled data (``eval_size: 0`` keeps none).
    """
    def resolve(p: str) -> Path:
        p = Path(p).expanduser()
        return p if p.is_absolute() else Path(base_dir) / p

    results = [load_file(resolve(cfg.path), cfg.format, cfg.system_prompt)]
    if cfg.eval_path:
        results.append(load_file(resolve(cfg.eval_path), cfg.format, cfg.system_prompt))
    if cfg.bad_rows == "error" and any(r.problems for r in results):
        raise bad_rows_error(results)
    for r in results:
        if not r.examples:
            raise DataError(f"{r.path} has no usable rows", [Problem(str(r.path), "must hold at least one good row",
                                                                     f"{r.rows_read} rows read, {sum(r.skipped.values())} bad",
                                                                     "check the file and data.format")])

    rng = random.Random(cfg.seed)
    train = list(results[0].examples)
    rng.shuffle(train)
    if cfg.max_rows:
        train = train[:cfg.max_rows]
    if cfg.eval_path:
        evals = list(results[1].examples)
        rng.shuffle(evals)
    else:
        k = _eval_count(len(train), cfg.eval_size)
        evals, train = train[:k], train[k:]

    skipped = sum((r.skipped for r in results), Counter())
    stats = {
        "rows_read": sum(r.rows_read for r in results),
        "rows_used": len(train) + len(evals),
        "skipped": sum(skipped.values()),
        "skipped_by_reason": dict(skipped.most_common()),
        "train_rows": len(train),
        "eval_rows": len(evals),
        "format": results[0].fmt,
    }
    return train, evals, stats


# ----------------------------------------------------------------------------- the stage

def plan(recipe, state) -> list:
    """``data`` first when the recipe has a dataset: a bad row is reported before minutes of model loading."""
    from dataclasses import asdict

    from toolchain.pipeline.artifacts import fingerprint_path
    from toolchain.pipeline.plan import Stage

    d = recipe.data
    if d is None:
        return []
    fps = {"path": fingerprint_path(recipe.resolve(d.path))}
    if d.eval_path:
        fps["eval_path"] = fingerprint_path(recipe.resolve(d.eval_path))
    return [Stage("data", "data", [], {"data": asdict(d), "files": fps}, run, f"read and split {d.path}")]


def run(ctx, inputs: dict, out: Path) -> dict:
    train, evals, stats = load_splits(ctx.recipe.data, ctx.recipe.base_dir)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "eval.jsonl", evals)
    return stats


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
