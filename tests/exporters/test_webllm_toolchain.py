"""The WebLLM model library's toolchain: TVM's web runtime built by Debian emscripten, a tiny Relax
module compiled for WebGPU, linked into a .wasm and run in headless chromium by the tvmjs that
@mlc-ai/web-llm 0.2.86 bundles."""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from exporters.webllm.library import toolchain
from tests.tolerances import WEBGPU_AXPY
from toolchain.core.errors import EdgesmithError

REPO = Path(__file__).resolve().parents[2]
RUN_JS = REPO / "web" / "test" / "webllm-toolchain" / "run.mjs"
N = 1000  # not a multiple of the kernel's thread block: the bounds check is exercised

WEBGPU_TARGET = {"kind": "webgpu", "host": {"kind": "llvm", "mtriple": "wasm32-unknown-unknown-wasm"}}


def _require(what: str, missing: list[str]) -> None:
    if missing and os.environ.get("EDGESMITH_REQUIRE_BROWSER"):
        pytest.fail(f"EDGESMITH_REQUIRE_BROWSER is set but {what} lacks: {'; '.join(missing)}")
    if missing:
        pytest.skip(f"{what} unavailable: {'; '.join(missing)}")


@pytest.fixture(scope="module")
def tools():
    _require("the webllm model-library toolchain", toolchain.missing_tools())


def test_missing_tools_name_their_fix(monkeypatch):
    monkeypatch.setattr(toolchain.shutil, "which", lambda name: None)
    missing = toolchain.missing_tools()
    assert any(m.startswith("emcc") and "apt-get install emscripten" in m for m in missing), missing
    assert any(m.startswith("em++") for m in missing), missing


def test_link_refuses_bitcode_and_missing_objects(tmp_path):
    bc = tmp_path / "lib0.bc"
    bc.write_bytes(b"BC\xc0\xde" + b"\0" * 16)
    with pytest.raises(EdgesmithError, match="bitcode"):
        toolchain._check_objects([bc])
    with pytest.raises(EdgesmithError, match="does not exist"):
        toolchain._check_objects([tmp_path / "absent.o"])
    with pytest.raises(EdgesmithError, match="no object files"):
        toolchain._check_objects([])


SUPPORT_CHECK_CC = r"""
#include <tvm/support/serializer.h>
#include <tvm/support/cuda/nvtx.h>
#include "support/arena.h"
#include "support/base64.h"
#include "support/bytes_io.h"
#include "support/ring_buffer.h"
#include "support/utils.h"

#include <cstdio>
#include <deque>
#include <random>

using namespace tvm;
using namespace tvm::support;

static void Hex(const char* tag, const std::string& s) {
  std::printf("%s ", tag);
  for (unsigned char c : s) std::printf("%02x", c);
  std::printf("\n");
}

int main() {
  int failures = 0;
  auto check = [&](bool ok, const char* what) { if (!ok) { ++failures; std::printf("FAIL %s\n", what); } };
  // serializer: fixed layout and round trip
  std::string buf;
  {
    BytesOutStream out(&buf);
    out.Write<uint64_t>(0x0102030405060708ull);
    out.Write<int32_t>(-2);
    out.Write<float>(1.5f);
    out.Write(std::string("ab"));
    out.Write(std::vector<int64_t>{7, -1});
    out.Write(ffi::String("xyz"));
    out.Write(ffi::Array<ffi::String>{"p", "qr"});
    DLDataType t{kDLFloat, 32, 4};
    out.Write(t);
    DLDevice d{kDLWebGPU, 3};
    out.Write(d);
    out.Write(std::unordered_map<std::string, int32_t>{{"k", 9}});
    ffi::Map<ffi::String, ffi::String> m;
    m.Set("a", "b");
    out.Write(m);
    int64_t shape[3] = {2, 3, 4};
    out.WriteArray(shape, 3);
  }
  Hex("SER", buf);
  {
    BytesInStream in(buf);
    uint64_t a; int32_t b; float c; std::string s; std::vector<int64_t> v; ffi::String fs;
    ffi::Array<ffi::String> arr; DLDataType t; DLDevice d; std::unordered_map<std::string, int32_t> um;
    ffi::Map<ffi::String, ffi::String> m; int64_t shape[3];
    check(in.Read(&a) && a == 0x0102030405060708ull, "u64");
    check(in.Read(&b) && b == -2, "i32");
    check(in.Read(&c) && c == 1.5f, "f32");
    check(in.Read(&s) && s == "ab", "string");
    check(in.Read(&v) && v.size() == 2 && v[0] == 7 && v[1] == -1, "vector");
    check(in.Read(&fs) && fs == "xyz", "ffi::String");
    check(in.Read(&arr) && arr.size() == 2 && arr[1] == "qr", "ffi::Array");
    check(in.Read(&t) && t.code == kDLFloat && t.bits == 32 && t.lanes == 4, "DLDataType");
    check(in.Read(&d) && d.device_type == kDLWebGPU && d.device_id == 3, "DLDevice");
    check(in.Read(&um) && um.size() == 1 && um["k"] == 9, "unordered_map");
    check(in.Read(&m) && m.size() == 1 && m.at("a") == "b", "ffi::Map");
    check(in.ReadArray(shape, 3) && shape[2] == 4, "ReadArray");
    uint8_t extra;
    check(!in.Read(&extra), "end of input");
  }
  // base64 of 0..9 byte prefixes of a fixed string, and back
  static const char kText[] = "\x00\xff\x10 edgesmith\x7f";
  const std::string text(kText, sizeof(kText) - 1);
  for (size_t n = 0; n <= text.size(); ++n) {
    std::string enc;
    BytesOutStream sink(&enc);
    Base64OutStream b64(&sink);
    b64.Write(text.data(), n);
    b64.Finish();
    std::printf("B64 %zu %s\n", n, enc.c_str());
    std::string spaced = " \n" + enc + "\n";
    BytesInStream src(spaced);
    Base64InStream dec(&src);
    dec.InitPosition();
    std::string back(n, '\0');
    check(dec.Read(&back[0], n) == n && back == text.substr(0, n), "base64 round trip");
    char more;
    check(dec.Read(&more, 1) == 0, "base64 end");
  }
  // ring buffer against a deque
  std::mt19937 rng(1);
  RingBuffer ring;
  std::deque<char> model;
  char next = 0;
  for (int step = 0; step < 20000; ++step) {
    int op = rng() % 4;
    size_t n = rng() % 3000;
    if (op == 0) {
      std::string chunk(n, 0);
      for (auto& ch : chunk) { ch = next++; model.push_back(ch); }
      ring.Write(chunk.data(), n);
    } else if (op == 1) {
      n = std::min(n, model.size());
      std::string got(n, 0);
      ring.Read(&got[0], n);
      for (char ch : got) { check(ch == model.front(), "ring read"); model.pop_front(); }
    } else if (op == 2) {
      size_t took = ring.ReadWithCallback([&](const void* p, size_t k) {
        size_t use = k ? 1 + rng() % k : 0;
        for (size_t i = 0; i < use; ++i) { check(static_cast<const char*>(p)[i] == model.front(), "ring cb read"); model.pop_front(); }
        return use; }, n);
      (void)took;
    } else {
      ring.WriteWithCallback([&](void* p, size_t k) {
        size_t use = k ? rng() % (k + 1) : 0;
        for (size_t i = 0; i < use; ++i) { static_cast<char*>(p)[i] = next; model.push_back(next++); }
        return use; }, n);
    }
    check(ring.bytes_available() == model.size(), "ring size");
  }
  // arena: alignment, distinct memory, reuse after RecycleAll
  Arena arena;
  for (int round = 0; round < 3; ++round) {
    std::vector<std::pair<int64_t*, int>> blocks;
    for (int i = 1; i < 300; ++i) {
      char* c = arena.allocate_<char>(i % 7);
      (void)c;
      int64_t* p = arena.allocate_<int64_t>(i);
      check(reinterpret_cast<uintptr_t>(p) % alignof(int64_t) == 0, "arena alignment");
      for (int j = 0; j < i; ++j) p[j] = int64_t(i) * 1000 + j;
      blocks.emplace_back(p, i);
    }
    for (auto& [p, n] : blocks)
      for (int j = 0; j < n; ++j) check(p[j] == int64_t(n) * 1000 + j, "arena overlap");
    arena.RecycleAll();
  }
  check(StartsWith("RPCSessionTimeoutError: x", "RPCSessionTimeoutError: ") && !StartsWith("R", "RPC"), "StartsWith");
  check(IsNumber("123") && !IsNumber("") && !IsNumber("1a"), "IsNumber");
  { NVTXScopedRange r("x"); NVTXScopedRange r2(std::string("y")); }
  std::printf("FAILURES %d\n", failures);
  return failures != 0;
}
"""

# What SUPPORT_CHECK_CC writes, spelled out from serializer.h's wire format (little-endian scalars,
# uint64 counts before strings/sequences/maps, DLDataType code:u8 bits:u8 lanes:u16, DLDevice 2 x i32).
SERIALIZED = (
    "0807060504030201" "feffffff" "0000c03f"  # uint64 0x0102030405060708, int32 -2, float 1.5
    "0200000000000000" "6162"  # std::string "ab"
    "0200000000000000" "0700000000000000" "ffffffffffffffff"  # std::vector<int64_t>{7, -1}
    "0300000000000000" "78797a"  # ffi::String "xyz"
    "0200000000000000" "0100000000000000" "70" "0200000000000000" "7172"  # ffi::Array {"p", "qr"}
    "02" "20" "0400" "0f000000" "03000000"  # DLDataType float32x4, DLDevice webgpu:3
    "0100000000000000" "0100000000000000" "6b" "09000000"  # unordered_map {"k": 9}
    "0100000000000000" "0100000000000000" "61" "0100000000000000" "62"  # ffi::Map {"a": "b"}
    "0200000000000000" "0300000000000000" "0400000000000000"  # WriteArray {2, 3, 4}: no count
)


def _host_cxx() -> str:
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    _require("a host C++ compiler", [] if cxx else ["c++ (fix: apt-get install g++)"])
    return cxx


def test_support_headers_streams_and_containers(tmp_path):
    """Our support headers, compiled natively against the tvm-ffi wheel: the serializer's bytes are
    the documented wire format and read back; base64 matches Python's; the ring buffer behaves as a
    FIFO under random reads/writes; arena memory is aligned and does not overlap."""
    cxx = _host_cxx()
    ffi = toolchain._package_dir("tvm_ffi")
    _require("the tvm-ffi wheel", [] if ffi else ["tvm_ffi (fix: pip install apache-tvm==0.27.0.post1)"])
    src = tmp_path / "support_check.cc"
    src.write_text(SUPPORT_CHECK_CC)
    exe = tmp_path / "support_check"
    sup = toolchain.SUPPORT_DIR
    subprocess.run([cxx, "-O1", "-std=c++17", f"-I{sup / 'src'}", f"-I{sup / 'include'}", f"-I{ffi / 'include'}",
                    str(src), "-o", str(exe), f"-L{ffi / 'lib'}", "-ltvm_ffi", f"-Wl,-rpath,{ffi / 'lib'}"],
                   check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True).stdout.splitlines()
    assert "FAILURES 0" in out, [line for line in out if line.startswith("FAIL")]
    assert [line for line in out if line.startswith("SER ")] == [f"SER {SERIALIZED}"]
    text = b"\x00\xff\x10 edgesmith\x7f"
    want = [f"B64 {n} {base64.b64encode(text[:n]).decode()}".rstrip() for n in range(len(text) + 1)]
    assert [line.rstrip() for line in out if line.startswith("B64 ")] == want


def test_fp16_header_matches_numpy(tmp_path):
    """builtin_fp16.h (ours): every half -> float exactly, float/double -> half rounded as numpy."""
    cxx = _host_cxx()
    src = tmp_path / "fp16.cc"
    src.write_text(r"""
#include <builtin_fp16.h>
#include <cstdio>
#include <cstdint>
#include <cstring>
int main() {
  for (uint32_t h = 0; h < 65536; ++h) {
    float f = __extendXfYf2__<uint16_t, uint16_t, 10, float, uint32_t, 23>(uint16_t(h));
    uint32_t b; std::memcpy(&b, &f, 4); std::printf("E %u %u\n", h, b);
  }
  uint32_t b;
  while (std::scanf("%u", &b) == 1) {
    float f; std::memcpy(&f, &b, 4);
    double d = double(f) * 1.0000001;
    uint64_t db; std::memcpy(&db, &d, 8);
    std::printf("T %u %u\n", b, unsigned(__truncXfYf2__<float, uint32_t, 23, uint16_t, uint16_t, 10>(f)));
    std::printf("D %llu %u\n", (unsigned long long)db,
                unsigned(__truncXfYf2__<double, uint64_t, 52, uint16_t, uint16_t, 10>(d)));
  }
}
""")
    exe = tmp_path / "fp16"
    inc = toolchain.SUPPORT_DIR / "3rdparty" / "compiler-rt"
    subprocess.run([cxx, "-O2", "-std=c++17", f"-I{inc}", str(src), "-o", str(exe)], check=True)
    rng = np.random.default_rng(0)
    # floats around half's whole range (subnormals, ties, overflow) plus a spread of all bit patterns
    near = (rng.uniform(-1, 1, 40000) * np.exp2(rng.integers(-27, 18, 40000))).astype(np.float32)
    spread = rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32)
    halves = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)  # exact ties
    with np.errstate(invalid="ignore"):  # inf + -inf between the two signs' infinities
        mids = ((halves[:-1].astype(np.float64) + halves[1:]) / 2).astype(np.float32)
    bits = np.concatenate([near.view(np.uint32), spread, mids[np.isfinite(mids)].view(np.uint32)])
    out = subprocess.run([str(exe)], input="\n".join(map(str, bits.tolist())), capture_output=True,
                         text=True, check=True).stdout.split("\n")
    rows = {"E": [], "T": [], "D": []}
    for line in filter(None, out):
        kind, a, b = line.split()
        rows[kind].append((int(a), int(b)))
    e = np.array(rows["E"], dtype=np.uint64)
    ref = e[:, 0].astype(np.uint16).view(np.float16).astype(np.float32)
    got = e[:, 1].astype(np.uint32).view(np.float32)
    nan = np.isnan(ref)
    assert np.array_equal(ref[~nan].view(np.uint32), got[~nan].view(np.uint32))
    assert np.isnan(got[nan]).all()
    for kind, dtype in (("T", np.uint32), ("D", np.uint64)):
        t = np.array(rows[kind], dtype=np.uint64)
        src_vals = t[:, 0].astype(dtype).view(np.float32 if kind == "T" else np.float64)
        with np.errstate(all="ignore"):
            want = src_vals.astype(np.float16)
        got = t[:, 1].astype(np.uint16)
        nan = np.isnan(src_vals)
        bad = np.flatnonzero((want.view(np.uint16) != got) & ~nan)
        assert bad.size == 0, f"{kind}: {bad.size} wrong, e.g. {src_vals[bad[:3]]} -> {got[bad[:3]]}"
        assert np.isnan(got[nan].view(np.float16)).all()


def _compile_axpy(out_dir: Path) -> list[Path]:
    import tvm
    from tvm.script import ir as I
    from tvm.script import relax as R

    @I.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor(("n",), "float32"), y: R.Tensor(("n",), "float32")):  # noqa: F821 (TVMScript)
            with R.dataflow():
                out = R.add(R.multiply(x, R.const(2.0, "float32")), y)
                R.output(out)
            return out

    executable = tvm.compile(Module, tvm.target.Target(WEBGPU_TARGET))
    return toolchain.export_objects(executable, out_dir)


def _browser_missing() -> list[str]:
    from runtimes.browser_runtime import missing_tools

    return missing_tools()


def test_library_runs_in_chromium_webgpu(tools, tmp_path):
    objects = _compile_axpy(tmp_path / "objs")
    assert [o.suffix for o in objects] == [".o"] * len(objects)
    assert all(o.read_bytes()[:4] == b"\0asm" for o in objects), "exported objects must be wasm objects"

    start = time.perf_counter()
    runtime = toolchain.build_web_runtime()
    runtime_s = time.perf_counter() - start
    start = time.perf_counter()
    assert toolchain.build_web_runtime() == runtime  # cached: same key, same file
    cached_runtime_s = time.perf_counter() - start

    wasm = tmp_path / "axpy-webgpu.wasm"
    start = time.perf_counter()
    toolchain.link_library(objects, wasm)
    link_s = time.perf_counter() - start
    cached_lib = next((Path(toolchain._cache_root()) / "libs").glob(
        f"lib-{toolchain.library_key(objects, runtime)}.wasm"))
    stamp = cached_lib.stat().st_mtime_ns
    start = time.perf_counter()
    toolchain.link_library(objects, tmp_path / "again.wasm")
    relink_s = time.perf_counter() - start
    assert cached_lib.stat().st_mtime_ns == stamp, "a re-run relinked instead of using the cache"
    assert wasm.read_bytes() == (tmp_path / "again.wasm").read_bytes()
    assert wasm.read_bytes()[:4] == b"\0asm"
    print(f"\nruntime build {runtime_s:.1f} s (cached call {cached_runtime_s:.2f} s), link {link_s:.1f} s "
          f"(cached {relink_s:.2f} s), wasm {wasm.stat().st_size / 1e6:.2f} MB")

    _require("the browser runtime", _browser_missing())
    rng = np.random.default_rng(0)
    x = rng.standard_normal(N).astype(np.float32)
    y = rng.standard_normal(N).astype(np.float32)
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"wasm": str(wasm), "func": "main", "inputs": [x.tolist(), y.tolist()],
                               "shape": [N], "timeout_s": 240}))
    proc = subprocess.run(["node", str(RUN_JS), str(job)], capture_output=True, text=True, timeout=400)
    lines = proc.stdout.strip().splitlines()
    assert lines, f"run.mjs printed nothing (exit {proc.returncode}): {proc.stderr[-3000:]}"
    result = json.loads(lines[-1])
    if not result["ok"] and "GPU" in result["error"] and not (
            os.environ.get("EDGESMITH_REQUIRE_BROWSER") or os.environ.get("EDGESMITH_REQUIRE_WEBGPU")):
        pytest.skip(f"no WebGPU adapter in headless chromium: {result['error']}")
    assert result["ok"], f"{result['error']}\nconsole: {result['console']}"
    got = np.array(result["values"], dtype=np.float32)
    want = 2 * x + y
    err = float(np.max(np.abs(got - want)))
    print(f"chromium WebGPU ({result['adapter']}), web-llm {result['webllm_version']}, load "
          f"{result['load_ms']:.0f} ms, max |err| {err:.2e}, args {result['chromium_args']}")
    assert got.shape == want.shape
    assert err <= WEBGPU_AXPY.atol, f"max |got - want| = {err}"
