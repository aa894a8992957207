"""Where the browser side is found: the assets shipped as package data, the npm packages in a clone's
web/node_modules or in the user cache keyed by the lock file, and the subprocess environments."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from toolchain.core import webassets
from toolchain.core.procenv import package_root, python_env

REPO = Path(__file__).resolve().parents[2]


def _assets(root: Path, lock: str = "{}") -> Path:
    root.mkdir(parents=True)
    (root / "package.json").write_text(json.dumps({"name": "t", "version": "0.0.0", "private": True,
                                                   "dependencies": {}}))
    (root / "package-lock.json").write_text(lock)
    return root


def test_the_assets_are_the_installed_package_data():
    assets = webassets.assets_dir()
    for name in ("driver.mjs", "package.json", "package-lock.json", "vendor-files.json", "page/app.js",
                 "page-webllm/app.js"):
        assert (assets / name).is_file(), name


def test_node_modules_go_to_the_cache_keyed_by_the_lock_file(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESMITH_CACHE", str(tmp_path / "cache"))
    one = _assets(tmp_path / "one", '{"lockfileVersion": 3}')
    two = _assets(tmp_path / "two", '{"lockfileVersion": 3, "x": 1}')
    assert webassets.node_modules_dir(one).parent.parent == tmp_path / "cache" / "web"
    assert webassets.node_modules_dir(one) != webassets.node_modules_dir(two)
    (two / "node_modules").mkdir()  # a clone after `npm run setup`: its own folder wins
    assert webassets.node_modules_dir(two) == two / "node_modules"


def test_setup_web_installs_from_the_lock_file_into_the_cache(tmp_path, monkeypatch):
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed")
    lock = {"name": "t", "version": "0.0.0", "lockfileVersion": 3, "requires": True,
            "packages": {"": {"name": "t", "version": "0.0.0", "dependencies": {}}}}
    assets = _assets(tmp_path / "assets", json.dumps(lock))
    monkeypatch.setenv("EDGESMITH_WEB", str(assets))
    monkeypatch.setenv("EDGESMITH_CACHE", str(tmp_path / "cache"))

    modules = webassets.install_web(log=lambda msg: None)

    root = modules.parent
    assert root.parent == tmp_path / "cache" / "web" and (root / "package-lock.json").is_file()
    assert not list(root.parent.glob("*.partial"))


def test_the_driver_finds_playwright_through_the_environment(tmp_path):
    if shutil.which("node") is None or not (webassets.node_modules_dir() / "playwright-core").is_dir():
        pytest.skip("node or playwright-core is missing")
    script = tmp_path / "probe.mjs"  # outside any node_modules tree: only the variable can find it
    script.write_text(f"import {{ loadPlaywright }} from {json.dumps(str(webassets.assets_dir() / 'driver.mjs'))};\n"
                      "const pw = await loadPlaywright(); console.log(typeof pw.chromium.launch);\n")
    proc = subprocess.run(["node", str(script)], capture_output=True, text=True, cwd=tmp_path,
                          env=webassets.driver_env(), timeout=60)
    assert proc.stdout.strip() == "function", proc.stderr


def test_a_python_worker_imports_this_edgesmith_from_any_folder(tmp_path):
    env = python_env()
    proc = subprocess.run([sys.executable, "-c", "import toolchain, sys; print(toolchain.__file__)"],
                          capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).resolve().parent == package_root() / "toolchain"
    assert not any(p.endswith("site-packages") for p in env.get("PYTHONPATH", "").split(os.pathsep))
