"""The page and the runtime files a bundle carries, taken from edgesmith's web assets.

Everything the page loads ships inside the bundle: ``page/*`` (index.html, app.js) of the assets
folder (``toolchain.core.webassets``: the repository's web/, installed as package data) and the files
``vendor-files.json`` lists, copied from the npm packages its lock file pins (``edgesmith setup
web``; in a clone also ``cd web && npm run setup``). transformers.min.js embeds the onnxruntime-web JavaScript; the
wasm binary and its .mjs glue it loads at run time must be the exact onnxruntime-web version
transformers.js depends on, which is checked here.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from toolchain.core.errors import PreflightError
from toolchain.core.webassets import SETUP_WEB, assets_dir, node_modules_dir

SOURCES = {  # vendor-files.json key -> folder inside node_modules
    "transformers": "@huggingface/transformers/dist",
    "ort": "onnxruntime-web/dist",
}


def _package_version(modules: Path, name: str) -> str:
    path = modules / name / "package.json"
    return json.loads(path.read_text())["version"] if path.is_file() else ""


def check_installed(web: Path | None = None) -> dict:
    """Versions of the vendored packages; raises with the fix when they are missing or stale."""
    web = web or assets_dir()
    if not (web / "page" / "app.js").is_file():
        raise PreflightError(f"webgpu export: {web} has no page/app.js: this edgesmith install lacks its browser "
                             f"page (fix: reinstall edgesmith, or set EDGESMITH_WEB to a clone's web/ folder)")
    modules = node_modules_dir(web)
    wanted = json.loads((web / "package.json").read_text())["dependencies"]
    versions, problems = {}, []
    for name in ("@huggingface/transformers", "onnxruntime-web"):
        versions[name] = _package_version(modules, name)
        if versions[name] != wanted.get(name):
            problems.append(f"{name} {versions[name] or 'missing'} (package.json pins {wanted.get(name)})")
    if not problems:
        tjs = json.loads((modules / "@huggingface/transformers/package.json").read_text())
        needs = tjs.get("dependencies", {}).get("onnxruntime-web")
        if needs != versions["onnxruntime-web"]:
            problems.append(f"transformers.js {versions['@huggingface/transformers']} is built against onnxruntime-web "
                            f"{needs}, package.json pins {versions['onnxruntime-web']}: the vendored wasm must "
                            f"match the JavaScript inside transformers.min.js")
    if problems:
        raise PreflightError(f"webgpu export: {modules} is not what {web / 'package-lock.json'} installs: "
                             f"{'; '.join(problems)} (fix: {SETUP_WEB})")
    return versions


def missing_packages() -> list[str]:
    """For `edgesmith targets`: what the bundle exporter lacks outside Python, each with its fix."""
    try:
        check_installed()
    except PreflightError as e:
        return [f"the browser page's npm packages ({str(e).split('(fix: ')[-1].rstrip(')')})" if "(fix: " in str(e)
                else str(e)]
    return []


def copy_page(dest: Path, web: Path | None = None) -> dict:
    """index.html, app.js and the vendored runtime into ``dest``; returns {versions, files, bytes}."""
    web = web or assets_dir()
    versions = check_installed(web)
    modules = node_modules_dir(web)
    files = []
    for src in sorted((web / "page").iterdir()):
        if src.is_file():
            shutil.copy2(src, dest / src.name)
            files.append(src.name)
    listing = json.loads((web / "vendor-files.json").read_text())
    for key, names in listing.items():
        (dest / "vendor" / key).mkdir(parents=True, exist_ok=True)
        for name in names:
            src = modules / SOURCES[key] / name
            if not src.is_file():
                raise PreflightError(f"webgpu export: {src} is missing (fix: {SETUP_WEB})")
            shutil.copy2(src, dest / "vendor" / key / name)
            files.append(f"vendor/{key}/{name}")
    size = sum((dest / f).stat().st_size for f in files)
    return {"versions": versions, "files": files, "bytes": size}
