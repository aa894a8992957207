"""Every file edgesmith writes for a user is written whole or not at all.

The pattern, once: write to a temporary name in the same folder (same file system, so the rename is
atomic), then ``os.replace`` it onto the final name. A crash or Ctrl-C leaves the old file or no
file, never a half-written one that looks complete. Folders (stage artifacts, bundles) follow the
same rule one level up: built as ``<name>.partial`` and renamed (``toolchain.pipeline.artifacts``).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator


def temp_name(path: Path) -> Path:
    """A hidden sibling of ``path``, unique to this process."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path to write ``path``'s content to; renamed onto ``path`` when the block
    ends without an exception, removed when it raises."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists() or tmp.is_symlink():
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _json_default(obj: Any) -> Any:
    """numpy scalars as numbers (``.item()``), anything else (paths, ...) as its string."""
    item = getattr(obj, "item", None)
    return item() if callable(item) and getattr(obj, "shape", None) == () else str(obj)


def write_json_atomic(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    text = json.dumps(obj, indent=indent, default=_json_default, allow_nan=True)
    write_text_atomic(path, text + "\n")


def copy_atomic(src: str | Path, dst: str | Path) -> None:
    """``shutil.copy2`` onto a temporary name, then renamed."""
    with atomic_path(dst) as tmp:
        shutil.copy2(src, tmp)


def symlink_atomic(link: str | Path, target: str | Path) -> None:
    """Point ``link`` at ``target`` (a relative path is kept relative), replacing what was there."""
    link = Path(link)
    with atomic_path(link) as tmp:
        os.symlink(target, tmp)
