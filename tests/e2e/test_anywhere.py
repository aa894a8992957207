"""The CLI as a user runs it: `edgesmith run recipe.yaml` in a folder outside the checkout, with a
relative model source, data path and output_dir, one target of each format (tests/e2e/anywhere.py).

setup: the user's folder in a temporary directory; execute: the installed console script, started
with that folder as its working directory; assert: every stage and bench row is there, gates pass,
no traceback was printed, and nothing points into the checkout.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import browser_tools_or_skip
from tests.e2e.anywhere import REPO, check_run, user_folder


def edgesmith_command() -> list[str]:
    exe = Path(sys.executable).with_name("edgesmith")
    return [str(exe)] if exe.exists() else [shutil.which("edgesmith") or "edgesmith"]


def test_a_run_from_a_folder_outside_the_checkout(tmp_path_factory, tiny_model_dir):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("llama_cpp")
    browser_tools_or_skip()
    root = tmp_path_factory.mktemp("user-folder")
    assert REPO not in root.parents
    recipe = user_folder(root, tiny_model_dir)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the install alone must suffice
    proc = subprocess.run([*edgesmith_command(), "run", str(recipe), "--quiet"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=1200)
    check_run(root, proc)
    assert (root / "runs" / "mine" / "train" / "adapter_model.safetensors").is_file()
