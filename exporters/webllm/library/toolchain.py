"""Emscripten half of the WebLLM model library: TVM's web runtime and the final ``.wasm`` link.

The apache-tvm wheel ships the sources of TVM's WebAssembly runtime (``tvm/web/emcc/*.cc``, which
``#include`` the runtime's ``.cc`` files from ``tvm/src`` and tvm-ffi's from the apache-tvm-ffi
wheel) but not nine small support headers they need; ``support/`` next to this file holds our own.
``build_web_runtime`` compiles the sources tvmjs's Makefile builds (``tvmjs_runtime.wasm``'s
inputs) with Debian's em++ into one relocatable object, and ``link_library`` links a model's
object files with it the way ``tvm.support.emcc.create_tvmjs_wasm`` does. Both results are cached
by content hash: a re-run neither recompiles nor relinks.

Model code must come as object files, not LLVM bitcode: the wheel's LLVM (22) writes opaque-pointer
bitcode that Debian emscripten 3.1.6's wasm-ld (LLVM 14) cannot read. ``export_objects`` writes
them.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from toolchain.core.errors import EdgesmithError
from toolchain.core.files import copy_atomic

SUPPORT_DIR = Path(__file__).resolve().parent / "support"

# What each missing tool is and how to get it.
TOOL_FIXES = {
    "emcc": "apt-get install emscripten",
    "em++": "apt-get install emscripten",
    "tvm": "pip install apache-tvm==0.27.0.post1",
}

# tvm/web/Makefile: dist/wasm/tvmjs_runtime.wasm is made of these three translation units
# (wasm_runtime.cc #includes the runtime and tvm-ffi sources it needs).
RUNTIME_SOURCES = ("wasm_runtime.cc", "tvmjs_support.cc", "webgpu_runtime.cc")

# tvm/web/Makefile's EMCC_CFLAGS, less the include paths (added from the wheels below).
COMPILE_FLAGS = ("-O3", "-std=c++17", "-Wno-ignored-attributes")

# tvm/support/emcc.py create_tvmjs_wasm: what tvmjs expects of a model library.
LINK_FLAGS = (
    "-O3", "-std=c++17",
    "--no-entry",  # a library: no main(), tvmjs calls the exported TVMFFI*/TVMWasm* functions
    "-s", "WASM_BIGINT=1",  # int64 crosses the JS boundary as BigInt
    "-s", "ERROR_ON_UNDEFINED_SYMBOLS=0",  # tvmjs provides the WebGPU/JS callbacks as imports
    "-s", "STANDALONE_WASM=1",  # WASI imports, which tvmjs's polyfill satisfies
    "-s", "ALLOW_MEMORY_GROWTH=1",
    "-s", "TOTAL_MEMORY=160MB",
)

# Source paths as the objects record them (__FILE__ in error messages): the build's temp tree and the
# wheels' directories are mapped to these names, so the runtime (and every library linked with it)
# is the same bytes wherever it is built and carries no local paths.
PATH_NAMES = {"tree": "tvm", "tvm_include": "tvm/include", "ffi_include": "tvm-ffi/include",
              "ffi_src": "tvm-ffi/src"}

# A relocatable link of the runtime objects into one (wasm-ld -r).
RELOCATABLE_FLAGS = ("-r",)

# versions() keys -> the PyPI distributions they come from
DISTRIBUTIONS = {"tvm": "apache-tvm", "tvm-ffi": "apache-tvm-ffi"}

RUNTIME_OBJECT = "tvm_web_runtime.o"


def _log(msg: str) -> None:
    print(f"[webllm toolchain] {msg}", file=sys.stderr, flush=True)


def _cache_root() -> Path:
    from toolchain.core.webassets import cache_root

    return cache_root() / "webllm"


# -- tools ----------------------------------------------------------------------------------------
def missing_tools() -> list[str]:
    """What building a model library needs and this machine lacks, each with its fix."""
    out = [f"{tool} (fix: {TOOL_FIXES[tool]})" for tool in ("emcc", "em++") if not shutil.which(tool)]
    if _package_dir("tvm") is None or _package_dir("tvm_ffi") is None:
        out.append(f"tvm (fix: {TOOL_FIXES['tvm']})")
    return out


def _package_dir(module: str) -> Path | None:
    """Where an installed package lives, found without importing it (importing tvm takes seconds)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def _require_tools() -> None:
    missing = missing_tools()
    if missing:
        raise EdgesmithError("webllm model library: missing tools: " + "; ".join(missing))


@functools.lru_cache(maxsize=4)
def _emcc_version(emcc: str) -> str:
    first = subprocess.run([emcc, "--version"], capture_output=True, text=True, check=True).stdout
    line = first.splitlines()[0] if first else ""
    m = re.search(r"\b(\d+\.\d+\.\d+)\b", line)
    return m.group(1) if m else line.strip()


def versions() -> dict:
    """emcc, tvm and tvm-ffi versions (None for a missing one): they go into manifests and cache keys."""
    out: dict = {"emcc": None}
    emcc = shutil.which("emcc")
    if emcc:
        out["emcc"] = _emcc_version(emcc)
    for key, dist in DISTRIBUTIONS.items():
        try:
            out[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[key] = None
    return out


# -- the wheels' source trees ---------------------------------------------------------------------
def _wheel_dirs() -> dict[str, Path]:
    """Where the two wheels keep what the web runtime build reads."""
    tvm_root, ffi_root = _package_dir("tvm"), _package_dir("tvm_ffi")
    if tvm_root is None or ffi_root is None:
        raise EdgesmithError(f"webllm model library: tvm is not installed (fix: {TOOL_FIXES['tvm']})")
    dirs = {
        "tvm_emcc": tvm_root / "web" / "emcc",
        "tvm_src": tvm_root / "src",
        "tvm_include": tvm_root / "include",
        "ffi_src": ffi_root / "src",
        "ffi_include": ffi_root / "include",
        "dlpack_include": ffi_root / "include",  # the wheel keeps dlpack/dlpack.h under include/
    }
    for name in RUNTIME_SOURCES:
        if not (dirs["tvm_emcc"] / name).is_file():
            raise EdgesmithError(
                f"webllm model library: {dirs['tvm_emcc'] / name} is missing: the apache-tvm wheel must "
                f"ship TVM's web runtime sources (fix: {TOOL_FIXES['tvm']})")
    if not (dirs["dlpack_include"] / "dlpack" / "dlpack.h").is_file():
        alt = ffi_root / "3rdparty" / "dlpack" / "include"
        if (alt / "dlpack" / "dlpack.h").is_file():
            dirs["dlpack_include"] = alt
    return dirs


def _files(root: Path, suffixes: tuple[str, ...] = (".h", ".cc", ".c")) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in suffixes)


def _hash_tree(h, label: str, root: Path) -> None:
    for p in _files(root):
        h.update(f"{label}/{p.relative_to(root).as_posix()}\0".encode())
        h.update(p.read_bytes())
        h.update(b"\0")


def runtime_key() -> str:
    """Hash of everything the runtime object depends on: tool versions, sources, our headers, flags."""
    _require_tools()
    dirs = _wheel_dirs()
    h = hashlib.sha256()
    h.update(json.dumps({"versions": versions(), "sources": RUNTIME_SOURCES, "compile": COMPILE_FLAGS,
                         "paths": PATH_NAMES, "relocatable": RELOCATABLE_FLAGS}, sort_keys=True).encode())
    for label in ("tvm_emcc", "tvm_src", "tvm_include", "ffi_src", "ffi_include"):
        _hash_tree(h, label, dirs[label])
    _hash_tree(h, "support", SUPPORT_DIR)
    return h.hexdigest()[:16]


def _stage_tree(root: Path, dirs: dict[str, Path]) -> None:
    """Lay out TVM's source-tree shape under `root`, the way tvm/web/Makefile's -I$(TVM_ROOT) sees it.

    The sources #include each other by paths such as "src/runtime/tensor.cc",
    "3rdparty/tvm-ffi/src/ffi/object.cc" and "../../support/arena.h"; the last kind is resolved
    against the real directory of the including file, so tvm's src/ and web/emcc/ are copied (2 MB)
    and our support headers are laid into the same tree.
    """
    shutil.copytree(dirs["tvm_src"], root / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(dirs["tvm_emcc"], root / "web" / "emcc", ignore=shutil.ignore_patterns("__pycache__"))
    ffi = root / "3rdparty" / "tvm-ffi"
    ffi.mkdir(parents=True)
    (ffi / "src").symlink_to(dirs["ffi_src"], target_is_directory=True)  # self-contained: a link
    shutil.copytree(SUPPORT_DIR, root, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))


def _include_flags(root: Path, dirs: dict[str, Path]) -> list[str]:
    return [f"-I{root}", f"-I{root / 'include'}", f"-I{dirs['tvm_include']}", f"-I{dirs['ffi_include']}",
            f"-I{dirs['dlpack_include']}", f"-I{root / '3rdparty' / 'compiler-rt'}"]


def _path_maps(root: Path, dirs: dict[str, Path]) -> list[str]:
    places = {"tree": root, "tvm_include": dirs["tvm_include"], "ffi_include": dirs["ffi_include"],
              "ffi_src": dirs["ffi_src"]}
    return [f"-ffile-prefix-map={places[k]}={name}" for k, name in PATH_NAMES.items()]


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-6000:]
        raise EdgesmithError(f"webllm model library: {what} failed (exit {proc.returncode}): "
                             f"{' '.join(cmd[:3])} ...\n{tail}")


def _jobs() -> int:
    return max(1, min(len(RUNTIME_SOURCES), os.cpu_count() or 1))


def build_web_runtime(cache_dir: Path | None = None) -> Path:
    """TVM's web runtime compiled by em++ into one relocatable object; built once per runtime_key().

    Returns the object's path: <cache_dir or ~/.cache/edgesmith/webllm>/runtime-<key>/tvm_web_runtime.o.
    """
    _require_tools()
    key = runtime_key()
    base = Path(cache_dir) if cache_dir is not None else _cache_root()
    final = base / f"runtime-{key}"
    obj = final / RUNTIME_OBJECT
    if obj.is_file():
        _log(f"web runtime: cached {obj}")
        return obj
    base.mkdir(parents=True, exist_ok=True)
    dirs = _wheel_dirs()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"runtime-{key}.tmp-", dir=base) as tmp:
        tmp = Path(tmp)
        tree = tmp / "tvm"
        _stage_tree(tree, dirs)
        flags = [*COMPILE_FLAGS, *_path_maps(tree, dirs), *_include_flags(tree, dirs)]
        objs = [tmp / (Path(name).stem + ".o") for name in RUNTIME_SOURCES]
        _log(f"web runtime: compiling {', '.join(RUNTIME_SOURCES)} with em++ "
             f"({_jobs()} at a time; minutes: about 3 min of CPU) into {final}")

        def compile_one(name: str, out: Path) -> str | None:
            cmd = ["em++", *flags, "-c", str(tree / "web" / "emcc" / name), "-o", str(out)]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if proc.returncode != 0:
                return f"em++ {name} (exit {proc.returncode}):\n{proc.stdout[-4000:]}"
            _log(f"web runtime: {name} compiled ({time.perf_counter() - start:.0f} s)")
            return None

        # the largest unit (wasm_runtime.cc, ~3/4 of the time) starts first
        with ThreadPoolExecutor(max_workers=_jobs()) as pool:
            failures = [f for f in pool.map(compile_one, RUNTIME_SOURCES, objs) if f]
        if failures:
            raise EdgesmithError("webllm model library: compiling TVM's web runtime failed: "
                                 + "\n".join(failures))
        combined = tmp / RUNTIME_OBJECT
        _run(["em++", *RELOCATABLE_FLAGS, *map(str, objs), "-o", str(combined)], "relocatable link of the runtime")
        out_dir = tmp / "out"
        out_dir.mkdir()
        combined.rename(out_dir / RUNTIME_OBJECT)
        (out_dir / "build.json").write_text(json.dumps({
            "key": key, "versions": versions(), "sources": list(RUNTIME_SOURCES), "compile_flags": list(COMPILE_FLAGS),
            "seconds": round(time.perf_counter() - start, 1)}, indent=2) + "\n")
        try:
            out_dir.rename(final)
        except OSError:  # another process finished the same build first: theirs is as good
            if not obj.is_file():
                raise
    _log(f"web runtime: built in {time.perf_counter() - start:.0f} s: {obj}")
    return obj


# -- model libraries ------------------------------------------------------------------------------
def _check_objects(objects: list[Path]) -> list[Path]:
    paths = [Path(o) for o in objects]
    if not paths:
        raise EdgesmithError("webllm model library: link_library got no object files "
                             "(fix: pass the files export_objects wrote)")
    for p in paths:
        if not p.is_file():
            raise EdgesmithError(f"webllm model library: object file {p} does not exist "
                                 "(fix: pass the files export_objects wrote)")
        head = p.read_bytes()[:4]
        if head == b"BC\xc0\xde":
            raise EdgesmithError(
                f"webllm model library: {p} is LLVM bitcode, which Debian emscripten's wasm-ld cannot "
                "read (the wheel's LLVM writes opaque-pointer bitcode) (fix: export object files with "
                "export_objects)")
    return paths


def library_key(objects: list[Path], runtime: Path) -> str:
    """Hash of the model objects' contents (in order), the runtime's key and the link flags."""
    h = hashlib.sha256()
    h.update(json.dumps({"link": LINK_FLAGS, "runtime": runtime.parent.name, "emcc": versions()["emcc"]}).encode())
    for p in objects:
        h.update(hashlib.sha256(Path(p).read_bytes()).digest())
    return h.hexdigest()[:16]


def link_library(objects: list[Path], out_wasm: Path, cache_dir: Path | None = None) -> Path:
    """Link model object files and the web runtime into the ``.wasm`` model library tvmjs loads.

    The linked library is cached under <cache>/lib-<key>.wasm (key: library_key) and copied to
    `out_wasm` (temp path, then rename); a re-run with the same objects does not relink.
    """
    _require_tools()
    objects = _check_objects(objects)
    out_wasm = Path(out_wasm)
    if out_wasm.suffix != ".wasm":
        raise EdgesmithError(f"webllm model library: output {out_wasm} must end in .wasm "
                             "(fix: name the model library <model>-webgpu.wasm)")
    runtime = build_web_runtime(cache_dir)
    key = library_key(objects, runtime)
    base = Path(cache_dir) if cache_dir is not None else _cache_root()
    cached = base / "libs" / f"lib-{key}.wasm"
    if cached.is_file():
        _log(f"model library: cached {cached}")
    else:
        cached.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"lib-{key}.tmp-", dir=cached.parent) as tmp:
            tmp_out = Path(tmp) / "lib.wasm"
            _log(f"model library: linking {len(objects)} object file(s) with the web runtime (emcc)")
            # as create_tvmjs_wasm: the runtime goes before the model's objects
            _run(["emcc", *LINK_FLAGS, "-o", str(tmp_out), str(runtime), *map(str, objects)],
                 "emcc link of the model library", cwd=Path(tmp))
            tmp_out.rename(cached)
        _log(f"model library: linked in {time.perf_counter() - start:.0f} s, "
             f"{cached.stat().st_size / 1e6:.2f} MB: {cached}")
    out_wasm.parent.mkdir(parents=True, exist_ok=True)
    tmp_copy = out_wasm.with_name(f".{out_wasm.name}.tmp-{os.getpid()}")
    shutil.copyfile(cached, tmp_copy)
    tmp_copy.replace(out_wasm)
    return out_wasm


def export_objects(executable, out_dir: Path) -> list[Path]:
    """Write a built TVM module's host code and packed device code as wasm object files.

    `executable` is what ``tvm.compile``/``relax.build`` returns (or a runtime Module). Its
    export_library is given a collector whose object_format is "o", so TVM writes objects (its
    default for .wasm, bitcode, does not link here). Returns the files, in TVM's order.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    collected: list[Path] = []

    def collect(_output, files, **_kwargs):
        for i, f in enumerate(files):
            src = Path(f)
            if src.suffix != ".o":
                raise EdgesmithError(f"webllm model library: TVM exported {src.name}, not an object file "
                                     "(fix: build with an llvm host target whose mtriple is "
                                     "wasm32-unknown-unknown-wasm)")
            dst = out_dir / f"{i:02d}-{src.name}"
            copy_atomic(src, dst)
            collected.append(dst)

    collect.object_format = "o"
    with tempfile.TemporaryDirectory(prefix="webllm-export-") as ws:
        executable.export_library(str(Path(ws) / "lib.wasm"), fcompile=collect, workspace_dir=ws)
    return collected
