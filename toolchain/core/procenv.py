"""The environment edgesmith starts its own Python subprocesses in (bench workers).

A worker must import the very edgesmith that started it, whatever its working directory: from a wheel
or an editable install it does already; from a clone run without installing it (``python -m
toolchain.cli`` in the repository), only because the repository is on ``sys.path`` there, so the
repository is put on the child's ``PYTHONPATH``. A site-packages folder is never put there (it would
come before the standard library).
"""
from __future__ import annotations

import os
import site
import sys
from pathlib import Path


def package_root() -> Path:
    """The folder holding the ``toolchain``, ``exporters`` and ``runtimes`` packages."""
    return Path(__file__).resolve().parents[2]


def python_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, **extra)
    root = package_root()
    site_dirs = {Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages(), *sys.path]
                 if p and p.endswith(("site-packages", "dist-packages"))}
    if root not in site_dirs:
        parts = [str(root)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(root)]
        env["PYTHONPATH"] = os.pathsep.join(parts)
    return env
