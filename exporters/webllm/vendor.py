"""The WebLLM bundle's chat page and its vendored @mlc-ai/web-llm, and the app-config entry.

The page (``page-webllm/`` of the web assets: index.html, app.js) imports ``./vendor/web-llm/index.js``,
web-llm's own single-file ES module (it embeds tvmjs, the tokenizers and xgrammar wasm), copied from
the npm packages ``edgesmith setup web`` installed from the assets' ``package-lock.json``
(``toolchain.core.webassets``). The version is checked against package.json and the lock file: the model
library's ABI must be the one that engine was built for.

How web-llm 0.2.86 reads an app-config ``ModelRecord`` (what the page relies on):

- ``model`` must be an absolute URL (web-llm calls ``new URL(model)``), and web-llm appends
  ``resolve/main/`` unless the URL already has a ``/resolve/<x>/`` part (Hugging Face layout). The
  bundle keeps ``models/<id>/`` relative; the page makes it absolute against ``location.href`` and
  appends ``resolve/../``, which web-llm's own URL normalisation turns back into ``models/<id>/``.
- from that folder it fetches ``mlc-chat-config.json``, ``tokenizer.json`` (or ``tokenizer.model``,
  per the chat config's ``tokenizer_files``), ``tensor-cache.json`` and every ``dataPath`` it lists.
- ``model_lib``: a relative URL is fetched against the page without caching; an absolute ``http``
  one goes through the artifact cache. Keep it relative (``libs/<id>.wasm``) so a rebuilt library
  is never served stale.
- config, tokenizer and weights always go through the artifact cache (``cacheBackend``: ``cache``,
  the Cache API, works on http://127.0.0.1 and https; ``indexeddb`` also works). The key is the URL,
  so the page clears a model's cache entries when the bundle's files changed (see app.js).
"""
from __future__ import annotations

import json
from pathlib import Path

from toolchain.core.errors import EdgesmithError, PreflightError
from toolchain.core.files import copy_atomic
from toolchain.core.webassets import SETUP_WEB, assets_dir, node_modules_dir

PACKAGE = "@mlc-ai/web-llm"
PAGE_DIR = "page-webllm"  # inside the web assets
VENDOR_FILES = {  # bundle path -> file inside node_modules/@mlc-ai/web-llm
    "vendor/web-llm/index.js": "lib/index.js",
}
LICENSE_FILES = {"vendor/web-llm/LICENSE": "LICENSE"}  # shipped when the package has it

# quantisation -> WebGPU features its kernels need (f16 arithmetic in WGSL needs shader-f16)
QUANT_FEATURES = {
    "q0f32": (),
    "q4f32_1": (),
    "q0f16": ("shader-f16",),
    "q4f16_1": ("shader-f16",),
}
CACHE_BACKENDS = ("cache", "indexeddb", "opfs")  # web-llm 0.2.86's AppConfig.cacheBackend values usable offline
DEFAULT_CACHE_BACKEND = "cache"  # the Cache API: web-llm's default and its best-tested backend


def check_installed(web: Path | None = None) -> str:
    """The installed web-llm version; raises with the fix when it is missing or not the pinned one."""
    web = web or assets_dir()
    if not (web / PAGE_DIR / "app.js").is_file():
        raise PreflightError(f"webllm export: {web / PAGE_DIR} has no app.js: this edgesmith install lacks its chat "
                             f"page (fix: reinstall edgesmith, or set EDGESMITH_WEB to a clone's web/ folder)")
    pinned = json.loads((web / "package.json").read_text()).get("dependencies", {}).get(PACKAGE)
    lock_path = web / "package-lock.json"
    locked = (json.loads(lock_path.read_text()).get("packages", {}).get(f"node_modules/{PACKAGE}", {})
              .get("version") if lock_path.is_file() else None)
    pkg = node_modules_dir(web) / PACKAGE / "package.json"
    installed = json.loads(pkg.read_text())["version"] if pkg.is_file() else None
    if pinned is None or locked != pinned:
        raise PreflightError(f"webllm export: {web / 'package.json'} pins {PACKAGE} {pinned!r} but its "
                             f"package-lock.json locks {locked!r}: they must agree (fix: cd {web} && npm install "
                             f"{PACKAGE}@{pinned} --ignore-scripts)")
    if installed != pinned:
        raise PreflightError(f"webllm export: {node_modules_dir(web)} has {PACKAGE} {installed or 'missing'}, "
                             f"package-lock.json locks {pinned} (fix: {SETUP_WEB})")
    return installed


def missing_packages() -> list[str]:
    """For `edgesmith targets`: what the WebLLM page lacks outside Python, each with its fix."""
    try:
        check_installed()
    except PreflightError as e:
        return [str(e)]
    return []


def copy_page(bundle_dir: Path, web: Path | None = None) -> dict:
    """index.html, app.js and web-llm's lib/index.js into ``bundle_dir``; returns {version, files, bytes}.

    Files are copied to a temporary name and renamed when whole."""
    web = web or assets_dir()
    bundle_dir = Path(bundle_dir)
    version = check_installed(web)
    copies = {src.name: src for src in sorted((web / PAGE_DIR).iterdir()) if src.is_file()}
    package = node_modules_dir(web) / PACKAGE
    copies.update({dest: package / src for dest, src in VENDOR_FILES.items()})
    copies.update({dest: package / src for dest, src in LICENSE_FILES.items() if (package / src).is_file()})
    for dest, src in copies.items():
        if not src.is_file():
            raise PreflightError(f"webllm export: {src} is missing (fix: {SETUP_WEB})")
        target = bundle_dir / dest
        target.parent.mkdir(parents=True, exist_ok=True)
        copy_atomic(src, target)
    files = sorted(copies)
    return {"version": version, "versions": {PACKAGE: version}, "files": files,
            "bytes": sum((bundle_dir / f).stat().st_size for f in files)}


def required_features(quant: str) -> list[str]:
    if quant not in QUANT_FEATURES:
        raise EdgesmithError(f"webllm app config: quantisation must be one of {', '.join(QUANT_FEATURES)}, got "
                             f"{quant!r} (fix: pick one of those in the recipe's webllm quants)")
    return list(QUANT_FEATURES[quant])


def app_config_entry(model_id: str, model_url: str, lib_url: str | None, quant: str, vram_required_MB: float,
                     overrides: dict | None = None) -> dict:
    """One web-llm ``ModelRecord``: ``model`` (the folder of mlc-chat-config.json, e.g. ``models/<id>/``),
    ``model_id``, ``model_lib`` (e.g. ``libs/<id>.wasm``), ``required_features`` from the quantisation,
    ``vram_required_MB`` and optional chat-config ``overrides`` (e.g. context_window_size). ``lib_url``
    None: no library was built for this quantisation; the record has no ``model_lib`` and the page
    refuses to load it with that reason."""
    if not model_id or "/" in model_id:
        raise EdgesmithError(f"webllm app config: model_id must be a non-empty name without '/', got {model_id!r} "
                             f"(fix: name it like SmolLM2-135M-Instruct-q4f32_1-MLC)")
    if not (vram_required_MB > 0):
        raise EdgesmithError(f"webllm app config: vram_required_MB of {model_id} must be positive, got "
                             f"{vram_required_MB!r} (fix: weights + KV cache + activations in MiB)")
    entry = {
        "model": model_url if model_url.endswith("/") else model_url + "/",
        "model_id": model_id,
        "required_features": required_features(quant),
        "vram_required_MB": round(float(vram_required_MB), 2),
        "low_resource_required": True,
    }
    if lib_url:
        entry["model_lib"] = lib_url
    if overrides:
        entry["overrides"] = dict(overrides)
    return entry


def app_config(entries: list[dict], cache_backend: str = DEFAULT_CACHE_BACKEND) -> dict:
    """The bundle's app-config.json: {"model_list": entries, "cacheBackend": ...} (web-llm 0.2.86 reads
    ``cacheBackend``; the older ``useIndexedDBCache`` flag is gone)."""
    if cache_backend not in CACHE_BACKENDS:
        raise EdgesmithError(f"webllm app config: cacheBackend must be one of {', '.join(CACHE_BACKENDS)}, got "
                             f"{cache_backend!r} (fix: use {DEFAULT_CACHE_BACKEND!r})")
    ids = [e["model_id"] for e in entries]
    if len(set(ids)) != len(ids):
        raise EdgesmithError(f"webllm app config: model ids must be unique, got {ids} (fix: one entry per quantisation)")
    return {"model_list": list(entries), "cacheBackend": cache_backend}
