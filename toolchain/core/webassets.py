"""Where the browser side lives: the page assets edgesmith ships, and the npm packages they need.

Two folders, found the same way in a clone and in a wheel install:

- the **assets** (``page/``, ``page-webllm/``, ``driver.mjs``, ``vendor-files.json``, ``package.json``,
  ``package-lock.json``, ``.npmrc``): the repository's ``web/`` folder, which the distribution installs
  as the package ``edgesmith_web`` (see setup.py), or ``$EDGESMITH_WEB``;
- the **node_modules** the lock file pins: ``<assets>/node_modules`` when it exists (a clone after
  ``cd web && npm run setup``), else a folder of the user cache keyed by the lock file's hash,
  ``~/.cache/edgesmith/web/<key>/node_modules`` (``$EDGESMITH_CACHE`` moves the cache), which
  ``edgesmith setup web`` fills from the package's own lock file.

The driver (``node driver.mjs``) finds playwright-core through ``$EDGESMITH_NODE_MODULES``, so the
two folders need not be side by side.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

from toolchain.core.errors import EdgesmithError

ASSETS_PACKAGE = "edgesmith_web"
SETUP_WEB = "edgesmith setup web"  # the exact command every "missing npm packages" message names
# copied into the cache folder before `npm ci` runs there: what npm reads
INSTALL_FILES = ("package.json", "package-lock.json", ".npmrc")
# install scripts stay off (web/.npmrc); these skip onnxruntime-node's CUDA download if it is bypassed
NPM_ENV = {"ONNXRUNTIME_NODE_INSTALL": "skip", "ONNXRUNTIME_NODE_INSTALL_CUDA": "skip"}
KEY_LEN = 12


def cache_root() -> Path:
    """edgesmith's user cache: ``$EDGESMITH_CACHE``, else ``~/.cache/edgesmith``."""
    env = os.environ.get("EDGESMITH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edgesmith"


def assets_dir() -> Path:
    """The folder holding the pages, the driver and the lock file."""
    env = os.environ.get("EDGESMITH_WEB")
    if env:
        return Path(env).expanduser().resolve()
    spec = importlib.util.find_spec(ASSETS_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]).resolve()
    # run from a clone without installing it: web/ beside the packages
    return Path(__file__).resolve().parents[2] / "web"


def lock_key(assets: Path | None = None) -> str | None:
    """Hash of the lock file (None without one): names the cache folder its packages go to."""
    lock = (assets or assets_dir()) / "package-lock.json"
    if not lock.is_file():
        return None
    return hashlib.sha256(lock.read_bytes()).hexdigest()[:KEY_LEN]


def install_root(assets: Path | None = None) -> Path:
    """The folder whose ``node_modules`` holds the packages: the assets folder itself when it already
    has a ``node_modules`` (a clone), else the cache folder for this lock file."""
    assets = assets or assets_dir()
    if (assets / "node_modules").is_dir():
        return assets
    return cache_root() / "web" / (lock_key(assets) or "no-lock-file")


def node_modules_dir(assets: Path | None = None) -> Path:
    return install_root(assets) / "node_modules"


def missing_npm(*names: str) -> list[str]:
    """Those npm packages (of the assets' package.json) not installed at their pinned version, each with the fix."""
    import json

    assets = assets_dir()
    pkg = assets / "package.json"
    pins = json.loads(pkg.read_text()).get("dependencies", {}) if pkg.is_file() else {}
    out = []
    for name in names:
        path = node_modules_dir(assets) / name / "package.json"
        have = json.loads(path.read_text()).get("version") if path.is_file() else None
        if have is None or have != pins.get(name):
            out.append(f"{name} {pins.get(name, '?')} in {node_modules_dir(assets)} (have {have or 'none'}; "
                       f"fix: {SETUP_WEB})")
    return out


def driver_command() -> list[str]:
    """``node <assets>/driver.mjs --session`` (absolute paths: any working directory works)."""
    return ["node", str(assets_dir() / "driver.mjs"), "--session"]


def driver_env(**extra: str) -> dict[str, str]:
    """The environment the driver runs in: where its npm packages are, plus ``extra``."""
    return dict(os.environ, EDGESMITH_NODE_MODULES=str(node_modules_dir()), **extra)


def install_web(log=print) -> Path:
    """``edgesmith setup web``: install the lock file's npm packages (``npm ci``, no install scripts)
    where :func:`node_modules_dir` looks; a fresh cache folder is built beside its final name and
    renamed into place when whole. Returns the node_modules folder."""
    assets = assets_dir()
    missing = [n for n in ("package.json", "package-lock.json") if not (assets / n).is_file()]
    if missing:
        raise EdgesmithError(f"{assets} has no {', '.join(missing)}: this edgesmith install lacks its browser "
                             f"assets (fix: reinstall edgesmith: pip install --force-reinstall edgesmith)")
    npm = shutil.which("npm")
    if npm is None:
        raise EdgesmithError("npm is not on PATH: the browser targets need Node.js 20+ with npm "
                             "(fix: sudo apt-get install nodejs npm, then run `edgesmith setup web` again)")
    root = install_root(assets)
    in_place = root == assets
    work = root if in_place else root.with_name(root.name + ".partial")
    if not in_place:
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        for name in INSTALL_FILES:
            if (assets / name).is_file():
                shutil.copy2(assets / name, work / name)
    log(f"installing the pinned npm packages of {assets / 'package-lock.json'} into {root / 'node_modules'}")
    proc = subprocess.run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=work,
                          env=dict(os.environ, **NPM_ENV), capture_output=True, text=True)
    if proc.returncode != 0:
        log_path = work / "npm-ci.log"
        log_path.write_text(proc.stdout + proc.stderr)
        last = next((line for line in reversed((proc.stderr or proc.stdout).strip().splitlines()) if line.strip()), "")
        raise EdgesmithError(f"npm ci failed (exit code {proc.returncode}): {last.strip()} (full log: {log_path}; "
                             f"fix: check that the npm registry is reachable, then run `{SETUP_WEB}` again)")
    if not in_place:
        if root.exists():
            shutil.rmtree(root)
        os.replace(work, root)
    return root / "node_modules"
