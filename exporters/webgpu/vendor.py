"""The page and the runtime files a bundle carries, taken from the repository's web/ folder.

Everything the page loads ships inside the bundle: ``web/page/*`` (index.html, app.js) and the
files ``web/vendor-files.json`` lists, copied from ``web/node_modules`` (installed from the lock
file with ``npm run setup``). transformers.min.js embeds the onnxruntime-web JavaScript; the
wasm binary and its .mjs glue it loads at run time must be the exact onnxruntime-web version
transformers.js depends on, which is checked here.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from toolchain.errors import PreflightError

SOURCES = {  # vendor-files.json key -> folder inside web/node_modules
    "transformers": "@huggingface/transformers/dist",
    "ort": "onnxruntime-web/dist",
}


def web_dir() -> Path:
    """web/ beside the packages (an editable install of the repository), or $EDGESMITH_WEB."""
    env = os.environ.get("EDGESMITH_WEB")
    return Path(env) if env else Path(__file__).resolve().parent.parent.parent / "web"


def _package_version(web: Path, name: str) -> str:
    path = web / "node_modules" / name / "package.json"
    return json.loads(path.read_text())["version"] if path.is_file() else ""


def check_installed(web: Path | None = None) -> dict:
    """Versions of the vendored packages; raises with the fix when web/node_modules is missing or stale."""
    web = web or web_dir()
    if not (web / "page" / "app.js").is_file():
        raise PreflightError(f"webgpu export: {web} has no page/app.js: the browser page ships with the edgesmith "
                             f"repository (fix: install edgesmith from a clone with `pip install -e .`, or set "
                             f"EDGESMITH_WEB to its web/ folder)")
    wanted = json.loads((web / "package.json").read_text())["dependencies"]
    versions, problems = {}, []
    for name in ("@huggingface/transformers", "onnxruntime-web"):
        versions[name] = _package_version(web, name)
        if versions[name] != wanted.get(name):
            problems.append(f"{name} {versions[name] or 'missing'} (package.json pins {wanted.get(name)})")
    if not problems:
        tjs = json.loads((web / "node_modules/@huggingface/transformers/package.json").read_text())
        needs = tjs.get("dependencies", {}).get("onnxruntime-web")
        if needs != versions["onnxruntime-web"]:
            problems.append(f"transformers.js {versions['@huggingface/transformers']} is built against onnxruntime-web "
                            f"{needs}, web/package.json pins {versions['onnxruntime-web']}: the vendored wasm must "
                            f"match the JavaScript inside transformers.min.js")
    if problems:
        raise PreflightError(f"webgpu export: web/node_modules is not what web/package-lock.json installs: "
                             f"{'; '.join(problems)} (fix: cd {web} && npm run setup)")
    return versions


def missing_packages() -> list[str]:
    """For `edgesmith targets`: what the bundle exporter lacks outside Python, each with its fix."""
    try:
        check_installed()
    except PreflightError as e:
        return [f"web/node_modules ({str(e).split('(fix: ')[-1].rstrip(')')})" if "(fix: " in str(e) else str(e)]
    return []


def copy_page(dest: Path, web: Path | None = None) -> dict:
    """index.html, app.js and the vendored runtime into ``dest``; returns {versions, files, bytes}."""
    web = web or web_dir()
    versions = check_installed(web)
    files = []
    for src in sorted((web / "page").iterdir()):
        if src.is_file():
            shutil.copy2(src, dest / src.name)
            files.append(src.name)
    listing = json.loads((web / "vendor-files.json").read_text())
    for key, names in listing.items():
        (dest / "vendor" / key).mkdir(parents=True, exist_ok=True)
        for name in names:
            src = web / "node_modules" / SOURCES[key] / name
            if not src.is_file():
                raise PreflightError(f"webgpu export: {src} is missing (fix: cd {web} && npm run setup)")
            shutil.copy2(src, dest / "vendor" / key / name)
            files.append(f"vendor/{key}/{name}")
    size = sum((dest / f).stat().st_size for f in files)
    return {"versions": versions, "files": files, "bytes": size}
