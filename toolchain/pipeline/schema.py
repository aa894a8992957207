"""A small typed-schema validator for YAML recipes.

Each recipe section is a dataclass whose fields carry their rule in ``field(metadata=...)``.
`validate_section` walks a mapping against a dataclass and collects *every* problem (unknown
keys with a "did you mean", wrong types, values out of range or not among the choices) instead
of stopping at the first one. Cross-field rules live in each section's ``check()`` method.

Line numbers come from PyYAML's node tree so errors read "recipe.yaml:12 train.lora.rank".
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import MISSING, field
from pathlib import Path
from typing import Any

import yaml

from toolchain.core.errors import Problem


def opt(default: Any = MISSING, *, help: str = "", choices: tuple | None = None,
        min: float | None = None, max: float | None = None, default_factory: Any = MISSING):
    """A recipe field: default, a one-line help text, and its rule (choices or bounds)."""
    meta = {"help": help, "choices": choices, "min": min, "max": max}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    if default is MISSING:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


class Located:
    """Maps dotted key paths to 1-based line numbers of the YAML source."""

    def __init__(self, filename: str, lines: dict[str, int] | None = None, overridden: set[str] | None = None):
        self.filename = filename
        self.lines = lines or {}
        self.overridden = set(overridden or ())  # keys set on the command line (--set), not read from the file

    def where(self, path: str) -> str:
        if any(path == k or path.startswith(k + ".") or path.startswith(k + "[") for k in self.overridden):
            return f"--set {path}"
        line = self.lines.get(path)
        if line is None and "." in path:  # fall back to the nearest parent with a line
            parent = path
            while "." in parent and line is None:
                parent = parent.rsplit(".", 1)[0]
                line = self.lines.get(parent)
        return f"{self.filename}:{line} {path}" if line else f"{self.filename} {path}"


def load_yaml_with_lines(path: Path) -> tuple[Any, dict[str, int]]:
    """Parse YAML and return (data, {dotted.key.path: line}). List items are `key[i]`."""
    text = Path(path).read_text()
    data = yaml.safe_load(text)
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}.{k.value}" if prefix else str(k.value)
                lines[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                key = f"{prefix}[{i}]"
                lines[key] = v.start_mark.line + 1
                walk(v, key)

    root = yaml.compose(text)
    if root is not None:
        walk(root, "")
    return data, lines


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return f"a list of {_type_name(arg)}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _type_fix(tp: Any) -> str:
    """How to write a value of type ``tp`` in YAML (the fix of a wrong-type problem)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return "write " + " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return "write a YAML list, e.g. [a, b]"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "write a YAML mapping of keys, e.g. {key: value}"
    return {int: "write a whole number without quotes, e.g. 8",
            float: "write a number without quotes, e.g. 0.001 or 2.0e-4",
            str: "quote the value, e.g. \"text\"",
            bool: "write true or false without quotes"}.get(tp, f"write {_type_name(tp)}")


def _coerce(value: Any, tp: Any, path: str, loc: Located, problems: list[Problem]) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        if len(others) == 1:  # Optional[X]: report X's own problems, not "must be X or null"
            return _coerce(value, others[0], path, loc, problems)
        for arg in args:
            if arg is type(None):
                continue
            sub: list[Problem] = []
            out = _coerce(value, arg, path, loc, sub)
            if not sub:
                return out
        problems.append(Problem(loc.where(path), f"must be {_type_name(tp)}", value, _type_fix(tp)))
        return None
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(Problem(loc.where(path), "must be a mapping", value, _type_fix(tp)))
            return None
        return validate_section(value, tp, path, loc, problems)
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        if isinstance(value, (str, int, float)) and arg is str and isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            problems.append(Problem(loc.where(path), f"must be {_type_name(tp)}", value, _type_fix(tp)))
            return None
        return [_coerce(v, arg, f"{path}[{i}]", loc, problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(Problem(loc.where(path), "must be a mapping", value, _type_fix(tp)))
            return None
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(Problem(loc.where(path), "must be true or false", value, _type_fix(tp)))
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(Problem(loc.where(path), "must be an integer", value, _type_fix(tp)))
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 2e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(Problem(loc.where(path), "must be a number", value, _type_fix(tp)))
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(Problem(loc.where(path), "must be a string", value, _type_fix(tp)))
        return value
    return value


def validate_section(data: dict, cls: type, path: str, loc: Located, problems: list[Problem]) -> Any:
    """Build ``cls`` from ``data``, appending every problem found to ``problems``."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # init=False fields are set by code, not YAML
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        kpath = f"{path}.{key}" if path else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            fix = f"did you mean `{close[0]}`?" if close else f"known keys: {', '.join(fields)}"
            problems.append(Problem(loc.where(kpath), "is not a known key", key, fix))
            continue
        f = fields[key]
        before = len(problems)
        val = _coerce(value, hints[key], kpath, loc, problems)
        if len(problems) == before:
            meta = f.metadata
            if meta.get("choices") and val not in meta["choices"]:
                names = [str(c) for c in meta["choices"]]
                close = difflib.get_close_matches(str(val), names, n=1)
                fix = f"did you mean `{close[0]}`?" if close else f"set it to one of: {', '.join(names)}"
                problems.append(Problem(loc.where(kpath), f"must be one of {', '.join(names)}", val, fix))
            if isinstance(val, (int, float)) and not isinstance(val, bool):
                if meta.get("min") is not None and val < meta["min"]:
                    problems.append(Problem(loc.where(kpath), f"must be at least {meta['min']}", val,
                                            f"set a value of {meta['min']} or more"))
                if meta.get("max") is not None and val > meta["max"]:
                    problems.append(Problem(loc.where(kpath), f"must be at most {meta['max']}", val,
                                            f"set a value of {meta['max']} or less"))
        kwargs[key] = val
    missing = [n for n, f in fields.items() if f.default is MISSING and f.default_factory is MISSING and n not in data]
    for name in missing:
        problems.append(Problem(loc.where(path or name), f"needs the key `{name}`", None,
                                fields[name].metadata.get("help", "")))
    if missing or any(v is None and not _allows_none(hints[k]) for k, v in kwargs.items()):
        kwargs = {k: v for k, v in kwargs.items() if v is not None or _allows_none(hints[k])}
    try:
        obj = cls(**{k: v for k, v in kwargs.items()}) if not missing else None
    except (TypeError, ValueError) as exc:
        problems.append(Problem(loc.where(path), str(exc), data))
        return None
    if obj is not None and hasattr(obj, "check"):
        for sub_path, rule, value, fix in obj.check():
            p = f"{path}.{sub_path}" if path else sub_path
            problems.append(Problem(loc.where(p), rule, value, fix))
    return obj


def _allows_none(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _section_of(tp: Any) -> tuple[type | None, str]:
    """The dataclass a field holds, directly, as ``X | None`` or as ``list[X]``, and how."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        others = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(others) == 1 and dataclasses.is_dataclass(others[0]):
            return others[0], "optional"
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        if dataclasses.is_dataclass(arg):
            return arg, "list"
    if dataclasses.is_dataclass(tp):
        return tp, ""
    return None, ""


def describe(cls: type, indent: int = 0) -> list[str]:
    """Reference text for a section: key, type, default and help (used by README and --help)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:  # set by code after loading, never written in a recipe
            continue
        tp = hints[f.name]
        section, how = _section_of(tp)
        if section is not None:
            note = {"optional": " (optional section)", "list": " (a list; each item has the keys below)"}.get(how, "")
            out.append(" " * indent + f"{f.name}:  # {f.metadata.get('help', '')}{note}")
            out += describe(section, indent + 2)
            continue
        default = f.default if f.default is not MISSING else ("(required)" if f.default_factory is MISSING else f.default_factory())
        rule = ""
        if f.metadata.get("choices"):
            rule = f" one of {list(f.metadata['choices'])};"
        out.append(" " * indent + f"{f.name}: {default!r}  # {_type_name(tp)};{rule} {f.metadata.get('help', '')}")
    return out
