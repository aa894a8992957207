"""edgesmith installed as a user installs it: a wheel built from this checkout, in a fresh virtual
environment, run in a folder outside the checkout (the recipe of tests/e2e/anywhere.py).

setup: `pip wheel` of the checkout; a new venv with the local torch build, the wheel with its extras,
and llama-cpp-python through `edgesmith setup llama-cpp` (the cached portable wheel the README command
built); an empty edgesmith cache. execute: `edgesmith doctor` (must name `edgesmith setup web`), `edgesmith
setup web` (npm packages from the wheel's own lock file into that cache), then `edgesmith run`. assert:
the assets come from the venv, not the checkout; every bench row of the recipe is there and passes.
Minutes (installs); slow.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import browser_tools_or_skip
from tests.e2e.anywhere import REPO, check_run, user_folder

pytestmark = pytest.mark.slow


def sh(cmd: list[str], timeout: int = 1800, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_a_wheel_install_runs_a_recipe_outside_the_checkout(tmp_path_factory, tiny_model_dir):
    pytest.importorskip("llama_cpp")  # its cached wheel is what the venv installs
    browser_tools_or_skip()
    from toolchain.cli.setup import wheel_cache

    if not list(wheel_cache().glob("llama_cpp_python-*.whl")):
        pytest.skip(f"no cached llama-cpp-python wheel in {wheel_cache()} (fix: edgesmith setup llama-cpp)")
    work = tmp_path_factory.mktemp("wheel")
    sh([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(work / "dist"), str(REPO)])
    (wheel,) = (work / "dist").glob("edgesmith-*.whl")
    venv = work / "venv"
    sh([sys.executable, "-m", "venv", str(venv)])
    py = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "EDGESMITH_WEB")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}", PIP_DISABLE_PIP_VERSION_CHECK="1",
               EDGESMITH_CACHE=str(work / "cache"), EDGESMITH_WHEEL_CACHE=str(wheel_cache().parent))
    sh([py, "-m", "pip", "install", "-q", "torch==2.13.0"], env=env)
    sh([py, "-m", "pip", "install", "-q", f"{wheel}[onnx,webllm]"], env=env)
    edgesmith = str(venv / "bin" / "edgesmith")
    sh([edgesmith, "setup", "llama-cpp"], env=env)

    # the assets are the wheel's, and doctor names the one command that installs the npm packages
    where = sh([py, "-c", "from toolchain.core.webassets import assets_dir; print(assets_dir())"], env=env, cwd=work)
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout
    doctor = subprocess.run([edgesmith, "doctor"], capture_output=True, text=True, env=env, cwd=work)
    assert "fix: edgesmith setup web" in doctor.stdout, doctor.stdout
    sh([edgesmith, "setup", "web"], env=env, cwd=work)
    doctor = subprocess.run([edgesmith, "doctor"], capture_output=True, text=True, env=env, cwd=work)
    assert "edgesmith setup web" not in doctor.stdout and str(work / "cache") in doctor.stdout, doctor.stdout

    root = work / "user-folder"
    recipe = user_folder(root, tiny_model_dir)
    proc = subprocess.run([edgesmith, "run", str(recipe), "--quiet"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=1800)
    check_run(root, proc)
