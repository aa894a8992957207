"""A browser bundle (exporters.webgpu) run in headless Debian chromium: wasm or WebGPU.

The runtime starts ``node <web assets>/driver.mjs --session`` (``toolchain.core.webassets``), which serves the bundle on 127.0.0.1 (Range
requests, cross-origin isolation headers so onnxruntime-web may use wasm threads), opens the
bundle's own index.html in chromium through playwright-core, and loads the model with
transformers.js. Every call then runs in that page through its ``window.edgesmith`` API, so
what is measured is the page a user opens:

- ``generate``: the page's greedy loop (``greedy``), stopping at a stop id like ``Runtime.generate``;
- ``logits``: every position's logits, written by the driver to a float32 file (``logitsAll``);
- ``bench``: the page's llama-bench-style loop (``bench``: warm-up, repetitions, prefill = one
  forward over the prompt, decode = gen_tokens - 1 single-token steps), in the shared schema;
- ``prefill``/``decode`` exist for the contract, but the KV cache lives in the page: ``decode``
  recomputes the whole sequence, so use ``generate`` or ``bench`` for anything timed.

Options: ``dtype`` (default: the page's choice from bundle.json for the device, as a user's
browser would pick), ``wasm_build`` (``plain``, the page's default on wasm, or ``jsep``: the
WebGPU-capable build, slower on the CPU), ``timeout_s`` per call (default 1800), ``chromium`` (default $CHROMIUM or
/usr/bin/chromium), ``model_file`` (accepted and unused: the bundle's wasm dtype is that file).
Memory is what the browser reports (``performance.measureUserAgentSpecificMemory`` where it
answers, else the JS heap), not this process's RSS.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from toolchain.core.benchschema import (
    BenchResult,
    BenchSettings,
    Stat,
    load_warning,
    machine_state,
)
from toolchain.core.webassets import (
    SETUP_WEB,
    driver_command,
    driver_env,
    node_modules_dir,
)

from .base import Runtime, dir_size_mb

DEFAULT_TIMEOUT_S = 1800
SOFTWARE_ADAPTERS = ("swiftshader", "llvmpipe", "lavapipe")


def chromium_path(option: str | None = None) -> str:
    return option or os.environ.get("CHROMIUM") or "/usr/bin/chromium"


def missing_tools(chromium: str | None = None) -> list[str]:
    """What the browser runtimes need and this machine lacks, each with its fix."""
    out = []
    if not shutil.which("node"):
        out.append("node (fix: apt-get install nodejs npm)")
    modules = node_modules_dir()
    if not (modules / "playwright-core").is_dir():
        out.append(f"playwright-core in {modules} (fix: {SETUP_WEB})")
    if not os.access(chromium_path(chromium), os.X_OK):
        out.append(f"chromium at {chromium_path(chromium)} (fix: apt-get install chromium, or set $CHROMIUM)")
    return out


class BrowserRuntime(Runtime):
    name = "browser"
    device = "wasm"

    def __init__(self, artifact_dir, threads: int = 2, **options: Any):
        super().__init__(artifact_dir, threads, **options)
        self.proc: subprocess.Popen | None = None
        self.loaded: dict = {}
        self.precision: str | None = None

    # -- the driver session ---------------------------------------------------------------------
    def load(self) -> None:
        if not (self.artifact_dir / "bundle.json").is_file():
            raise FileNotFoundError(f"{self.artifact_dir / 'bundle.json'} not found: {self.artifact_dir} is not a "
                                    f"browser bundle (fix: export it with the `webgpu` format)")
        missing = missing_tools(self.options.get("chromium"))
        if missing:
            raise RuntimeError(f"the {self.name} runtime needs: {'; '.join(missing)}")
        self.timeout_s = float(self.options.get("timeout_s", DEFAULT_TIMEOUT_S))
        self._before = machine_state()  # before chromium starts: its own processes are not "other load"
        self.start_driver()
        header = {"bundle": str(self.artifact_dir.resolve()), "device": self.device, "timeout_s": self.timeout_s,
                  "threads": self.threads if self.device == "wasm" else None, "dtype": self.options.get("dtype"),
                  "wasm_build": self.options.get("wasm_build")}
        reply = self._exchange(header)
        if not reply.get("ok"):
            self.close()
            raise RuntimeError(f"{self.name}: the bundle did not load in chromium ({reply.get('failed_step')}): "
                               f"{reply.get('error')}")
        self.loaded = dict(reply["load"], info=reply.get("info"))
        # the bundle says which precision each of its dtypes is (the exporter owns that fact)
        precisions = json.loads((self.artifact_dir / "bundle.json").read_text()).get("precisions") or {}
        self.precision = precisions.get(self.loaded.get("dtype"))

    def start_driver(self) -> None:
        """``node driver.mjs --session`` on Debian's chromium (or the ``chromium`` option); stderr kept for errors."""
        self._stderr = tempfile.TemporaryFile(mode="w+")
        env = driver_env(CHROMIUM=chromium_path(self.options.get("chromium")))
        self.proc = subprocess.Popen(driver_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr, text=True, env=env)

    def _exchange(self, message: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"{self.name}: the driver is not running{self._stderr_tail()}")
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name}: the driver exited (code {self.proc.wait()}){self._stderr_tail()}")
        return json.loads(line)

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        tail = self._stderr.read().strip().splitlines()[-5:]
        return (": " + " | ".join(tail)) if tail else ""

    def call(self, op: str, *args, save: str | None = None) -> Any:
        """Run ``window.edgesmith[op](*args)`` in the page; its result, or RuntimeError with the page's error."""
        if self.proc is None:
            self.load()
        message = {"op": op, "args": list(args)}
        if save:
            message["save"] = save
        reply = self._exchange(message)
        if not reply.get("ok"):
            console = "; ".join(reply.get("console") or [])[:500]
            raise RuntimeError(f"{self.name}: {op} failed in the page: {reply.get('error')}"
                               + (f" (console: {console})" if console else ""))
        return reply["result"]

    def close(self) -> None:
        if self.proc is None:
            return
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- the runtime contract ---------------------------------------------------------------------
    def logits(self, ids: Sequence[int]) -> np.ndarray:
        ids = [int(i) for i in ids]
        with tempfile.TemporaryDirectory() as tmp:
            path = str(Path(tmp) / "logits.f32")
            result = self.call("logitsAll", ids, save=path)
            rows, vocab = result["shape"]
            return np.fromfile(path, dtype="<f4").reshape(rows, vocab)

    def prefill(self, ids: Sequence[int], all_logits: bool = False) -> tuple[np.ndarray, list[int]]:
        ids = [int(i) for i in ids]
        if all_logits:
            return self.logits(ids), ids
        return np.asarray([self.call("logits", ids)], dtype=np.float32), ids

    def decode(self, state: list[int], token: int) -> tuple[np.ndarray, list[int]]:
        ids = [*state, int(token)]  # no cache across calls: the whole sequence again (see the docstring)
        return np.asarray([self.call("logits", ids)], dtype=np.float32), ids

    def generate(self, ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = (),
                 on_token: Callable[[int], None] | None = None) -> list[int]:
        if max_new_tokens <= 0:
            return []
        # always the page's manual greedy loop (a stop id that never occurs when none is given): without
        # stop ids the page would use model.generate, which also applies generation_config.json's
        # processors (repetition_penalty, ...) that no other runtime applies
        stops = [int(s) for s in stop_ids] or [-1]
        out = [int(t) for t in self.call("greedy", [int(i) for i in ids], int(max_new_tokens), stops)]
        for tok in out:
            if on_token:
                on_token(tok)
        return out

    def tokenizer_check(self) -> dict:
        """The page's tokenizer and chat template against transformers' on the fixed string and
        conversation set the ONNX exporter checks onnxruntime-genai with; and the page's EOS list."""
        bundle = json.loads((self.artifact_dir / "bundle.json").read_text())
        model_dir = self.artifact_dir / "models" / self.loaded.get("model_id", bundle["model_id"])
        result = compare_tokenizer(self.call, model_dir)
        eos = sorted(self.loaded.get("eos_token_id") or [])
        if eos != sorted(bundle.get("eos_token_id") or eos):
            result["mismatches"].append({"kind": "eos_token_id", "text": "generation_config.json",
                                         "hf": sorted(bundle["eos_token_id"]), "browser": eos, "first_difference": 0})
            result["ok"] = False
        return result

    def artifact_files(self):
        """The page, its runtime and the files of the dtype loaded (not the other dtypes' files)."""
        bundle = json.loads((self.artifact_dir / "bundle.json").read_text())
        model = self.artifact_dir / bundle["files"][self.loaded["dtype"]] if self.loaded.get("dtype") in bundle.get(
            "files", {}) else None
        paths = [p for p in self.artifact_dir.iterdir() if p.name != "models"]
        if model is None:
            return [*paths, self.artifact_dir / "models"]
        side = [p for p in model.parent.parent.iterdir() if p.is_file()]
        return [*paths, *side, model, *sorted(model.parent.glob(model.name + "_data*"))]

    def on_software_adapter(self) -> bool:
        """Whether the loaded page's WebGPU adapter is a CPU rasteriser (SwiftShader, llvmpipe, ...)."""
        return any(s in json.dumps(self.loaded.get("adapter_info") or {}).lower() for s in SOFTWARE_ADAPTERS)

    def software_adapter_warning(self) -> str:
        adapter = self.loaded.get("adapter_info") or {}
        return (f"WebGPU ran on a software adapter ({adapter.get('vendor')} {adapter.get('architecture')}): "
                f"its speed says nothing about a GPU")

    def bench(self, prompt_ids: Sequence[int], settings: BenchSettings, target: str = "",
              load_s: float | None = None, rss_before_load: float | None = None) -> BenchResult:
        if load_s is None:
            t = time.perf_counter()
            self.load()
            load_s = time.perf_counter() - t
        check = self.tokenizer_check()
        if not check["ok"]:
            first = check["mismatches"][0]
            raise RuntimeError(f"{self.name}: the page's tokenizer disagrees with transformers' on "
                               f"{len(check['mismatches'])} check(s), e.g. {first['kind']} of {first['text']!r}: "
                               f"transformers {first['hf']!r}, browser {first['browser']!r} (fix: check the bundle's "
                               f"tokenizer.json and tokenizer_config.json)")
        ids = [int(i) for i in prompt_ids][: settings.prompt_tokens]
        r = self.call("bench", ids, settings.gen_tokens, settings.repetitions, settings.warmup)
        memory = {"js_heap": r.get("memory"), "user_agent_specific": r.get("ua_memory")}
        # JS + wasm memory of the page (measureUserAgentSpecificMemory; GPU buffers not included), else the JS heap
        peak = (r.get("ua_memory") or {}).get("bytes") or (r.get("memory") or {}).get("usedJSHeapSize")
        before = self._before
        warnings = [w for w in [load_warning(before, self.threads)] if w]
        if self.device == "webgpu" and self.on_software_adapter():
            warnings.append(self.software_adapter_warning())
        if self.device == "wasm" and not self.loaded.get("crossOriginIsolated"):
            warnings.append("the page was not cross-origin isolated: onnxruntime-web ran on one wasm thread")
        return BenchResult(
            runtime=self.name, target=target, settings=settings, load_s=load_s,
            ttft_ms=Stat.of(r["ttft_ms"]), prefill_tps=Stat.of(r["prefill_tps"]), decode_tps=Stat.of(r["decode_tps"]),
            peak_rss_mb=(peak / 2**20) if peak else float("nan"), rss_before_load_mb=float("nan"),
            artifact_mb=dir_size_mb(self.artifact_files()),
            machine={"before": before, "after": machine_state(sample_s=0), "threads": self.threads,
                     "browser": {**self.loaded, "memory": memory, "tokenizer_check": check, "model_load_s": self.loaded.get("load_ms", 0) / 1000}},
            warnings=warnings,
        )


class BrowserWasmRuntime(BrowserRuntime):
    name = "browser-wasm"
    device = "wasm"


class BrowserWebgpuRuntime(BrowserRuntime):
    name = "browser-webgpu"
    device = "webgpu"


def compare_tokenizer(call, model_dir, user_last_only: bool = False) -> dict:
    """A page's tokenizer (``call("encode", text)``) and chat prompt ids (``call("chatIds", messages)``)
    against transformers' on the fixed strings and conversations (those the template accepts;
    ``user_last_only``: those ending with a user message, for a chat API that answers one)."""
    from transformers import AutoTokenizer

    from toolchain.core.prompts import CHECK_CONVERSATIONS, CHECK_STRINGS

    hf = AutoTokenizer.from_pretrained(model_dir)
    mismatches, conversations = [], 0

    def differ(kind, text, want, got):
        first = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
        mismatches.append({"kind": kind, "text": text[:200], "hf": want, "browser": got, "first_difference": first})

    for text in CHECK_STRINGS:
        want, got = hf.encode(text, add_special_tokens=False), call("encode", text)
        if list(want) != list(got):
            differ("encode", text, list(want), got)
    for messages in CHECK_CONVERSATIONS if hf.chat_template else ():
        if user_last_only and messages[-1]["role"] != "user":
            continue
        try:
            want = list(hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
        except Exception:  # noqa: BLE001 - the template refuses this conversation (e.g. a system role)
            continue
        conversations += 1
        got = call("chatIds", messages)
        if want != got:
            differ("chat_template", json.dumps(messages), want, got)
    return {"strings": len(CHECK_STRINGS), "conversations": conversations, "mismatches": mismatches,
            "ok": not mismatches}

