"""A WebLLM bundle (exporters.webllm) run in headless Debian chromium through @mlc-ai/web-llm's engine.

Same driver as the ONNX bundle's browser runtime (``node <web assets>/driver.mjs --session``: the bundle served
on 127.0.0.1, its own index.html opened in chromium with WebGPU on, every non-local request blocked),
but the page is the WebLLM chat page: the model is loaded by web-llm's ``MLCEngine`` from the bundle's
app-config.json, so what is measured is the engine a user's page runs.

- ``generate``: greedy through the engine's ``forwardTokensAndSample`` (prefill over the ids, then
  one-token decode steps with web-llm's paged KV cache), temperature 0, stopping at a stop id;
- ``bench``: the page's llama-bench-style loop in the shared schema (prefill = the prompt until the
  first token is on the CPU, decode = gen_tokens - 1 steps, never stopping at EOS);
- ``logits``: web-llm's engine exposes no logits; the page reads them through a ``LogitProcessor``
  (attached only for that call), feeding one token per step, so row t is the decode-path logits
  after ids[:t+1]. It costs one engine step per position: quality rows should rely on greedy match
  and use ``logits`` only on short sequences;
- ``prefill``/``decode`` exist for the contract only: the KV cache lives in the page, so ``decode``
  recomputes the sequence.

Options: ``model_id`` (an app-config model id; default bundle.json's primary quantisation's, else the
first record), ``quant`` (picks ``<model>-<quant>-MLC``-style ids by suffix), ``timeout_s`` per call
(default 1800), ``chromium``, ``cache_backend`` (web-llm's: cache | indexeddb | opfs).
Only WebGPU: on a machine without a GPU chromium's SwiftShader adapter runs it (no shader-f16, so f32
quantisations only) and its speed says nothing about a GPU.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

from toolchain.core.benchschema import (
    BenchResult,
    BenchSettings,
    Stat,
    load_warning,
    machine_state,
)

from .base import dir_size_mb
from .browser_runtime import BrowserRuntime

APP_CONFIG = "app-config.json"
# On a software WebGPU adapter (SwiftShader: Vulkan emulated on the CPU) SmolLM2-135M q0f32 ran at
# 0.38 tok/s prefill and 0.05 tok/s decode here (a 2-prompt x 8-token run took 14 minutes), so a full
# benchmark (6 greedy prompts, logits over 256 positions at one engine step each, 3 repetitions)
# would take hours. There the benchmark worker runs this much (toolchain.stages.benchworker; the result
# records it); option `limits` overrides it ({} for the full measurement).
SOFTWARE_LIMITS = {"greedy_prompts": 2, "greedy_tokens": 6, "logit_positions": 0, "prompt_tokens": 8,
                   "gen_tokens": 2, "repetitions": 1, "warmup": 0}
SOFTWARE_WHY = ("WebGPU on a software adapter: greedy parity on the first fixed prompts and a short benchmark; "
                "logit quality is the NumPy reference check of the same files (export manifest)")


class BrowserWebllmRuntime(BrowserRuntime):
    name = "browser-webllm"
    device = "webgpu"

    # -- the bundle -------------------------------------------------------------------------------
    def _app_config(self) -> dict:
        path = self.artifact_dir / APP_CONFIG
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {self.artifact_dir} is not a WebLLM bundle (fix: export it "
                                    f"with the `webllm` format)")
        return json.loads(path.read_text())

    def model_id(self) -> str:
        """The app-config model id this runtime loads (options model_id, quant, then bundle.json's primary)."""
        ids = [r["model_id"] for r in self._app_config().get("model_list", [])]
        wanted = self.options.get("model_id")
        quant = self.options.get("quant")
        if wanted is None and quant is None:
            bundle = self.artifact_dir / "bundle.json"
            quant = json.loads(bundle.read_text()).get("primary") if bundle.is_file() else None
            if quant is None:
                return ids[0] if ids else ""
        if wanted is None:
            hits = [i for i in ids if f"-{quant}" in i or i.endswith(quant)]
            if len(hits) != 1:
                raise ValueError(f"{self.name}: quant {quant!r} matches {hits or 'no'} model ids of {APP_CONFIG} "
                                 f"({', '.join(ids)}) (fix: pass model_id= one of them)")
            return hits[0]
        if wanted not in ids:
            raise ValueError(f"{self.name}: model_id {wanted!r} is not in {APP_CONFIG} ({', '.join(ids)}) "
                             f"(fix: one of those)")
        return wanted

    # -- the driver session ---------------------------------------------------------------------
    def load(self) -> None:
        from .browser_runtime import missing_tools as browser_missing

        self._app_config()
        model_id = self.model_id()
        missing = browser_missing(self.options.get("chromium"))  # the bundle carries web-llm itself
        if missing:
            raise RuntimeError(f"the {self.name} runtime needs: {'; '.join(missing)}")
        self.timeout_s = float(self.options.get("timeout_s", 1800))
        self._before = machine_state()
        self.start_driver()
        load_options = {k: self.options[k] for k in ("cache_backend",) if self.options.get(k)}
        header = {"bundle": str(self.artifact_dir.resolve()), "device": "webgpu", "timeout_s": self.timeout_s,
                  "model_id": model_id, "load_options": load_options}
        reply = self._exchange(header)
        if not reply.get("ok"):
            self.close()
            raise RuntimeError(f"{self.name}: the bundle did not load in chromium ({reply.get('failed_step')}): "
                               f"{reply.get('error')}")
        self.loaded = dict(reply["load"], info=reply.get("info"))
        # the gates are keyed by the MLC quantisation name (toolchain/quality/gates.py: webllm/<quant>)
        self.precision = self.loaded.get("quant") or None
        limits = self.options.get("limits", SOFTWARE_LIMITS if self.on_software_adapter() else None)
        self.limits = dict(limits, why=SOFTWARE_WHY) if limits else None

    # -- the runtime contract ---------------------------------------------------------------------
    def artifact_files(self):
        """The page, web-llm, app-config.json, and the loaded model's folder and library (not the other quants')."""
        root = self.artifact_dir
        mid = self.loaded.get("model_id") or self.model_id()
        record = next((r for r in self._app_config()["model_list"] if r["model_id"] == mid), {})
        paths = [p for p in root.iterdir() if p.is_file()] + [root / "vendor"]
        paths.append(root / "models" / mid)
        if record.get("model_lib"):
            paths.append(root / record["model_lib"])
        return [p for p in paths if p.exists()]

    def tokenizer_check(self) -> dict:
        """web-llm's tokenizer (tokenizers-cpp over tokenizer.json) against transformers' on the fixed
        strings, and the prompt ids web-llm builds from mlc-chat-config.json's conv_template against
        the HF chat template's, on the fixed conversations (those the template accepts and that end
        with a user message: web-llm's chat API answers one)."""
        from .browser_runtime import compare_tokenizer

        return compare_tokenizer(self.call, self.artifact_dir / "models" / self.loaded["model_id"],
                                 user_last_only=True)

    def bench(self, prompt_ids: Sequence[int], settings: BenchSettings, target: str = "",
              load_s: float | None = None, rss_before_load: float | None = None) -> BenchResult:
        if load_s is None:
            t = time.perf_counter()
            self.load()
            load_s = time.perf_counter() - t
        check = self.tokenizer_check()
        ids = [int(i) for i in prompt_ids][: settings.prompt_tokens]
        r = self.call("bench", ids, settings.gen_tokens, settings.repetitions, settings.warmup)
        before = self._before
        warnings = [w for w in [load_warning(before, self.threads)] if w]
        if not check["ok"]:
            first = check["mismatches"][0]
            warnings.append(f"web-llm's tokenizer or conv_template disagrees with transformers on "
                            f"{len(check['mismatches'])} check(s), e.g. {first['kind']} of {first['text'][:80]!r}")
        if self.on_software_adapter():
            warnings.append(self.software_adapter_warning())
        heap = (r.get("memory") or {}).get("usedJSHeapSize")
        return BenchResult(
            runtime=self.name, target=target, settings=settings, load_s=load_s,
            ttft_ms=Stat.of(r["ttft_ms"]), prefill_tps=Stat.of(r["prefill_tps"]), decode_tps=Stat.of(r["decode_tps"]),
            # the JS heap only: web-llm keeps weights and KV cache in GPU buffers, which no page API reports
            peak_rss_mb=(heap / 2**20) if heap else float("nan"), rss_before_load_mb=float("nan"),
            artifact_mb=dir_size_mb(self.artifact_files()),
            machine={"before": before, "after": machine_state(sample_s=0), "threads": self.threads,
                     "browser": {**self.loaded, "memory": {"js_heap": r.get("memory")}, "tokenizer_check": check,
                                 "model_load_s": self.loaded.get("load_ms", 0) / 1000,
                                 "vram_required_MB": self.loaded.get("vram_required_MB")}},
            warnings=warnings,
        )

    def chat(self, messages: list[dict], max_tokens: int = 128, **options: Any) -> dict:
        """One chat turn through web-llm's OpenAI-style API at temperature 0: {text, ids, finish_reason, usage, ms}."""
        return self.call("chat", messages, {"max_tokens": int(max_tokens), "temperature": 0, **options})


def missing_tools(chromium: str | None = None) -> list[str]:
    """What this runtime needs and the machine lacks (node, playwright-core, chromium, web-llm), each with its fix."""
    from toolchain.core.webassets import missing_npm

    from .browser_runtime import missing_tools as browser_missing

    return browser_missing(chromium) + missing_npm("@mlc-ai/web-llm")


def bundle_model_ids(bundle: str | Path) -> list[str]:
    """The model ids of a WebLLM bundle's app-config.json."""
    return [r["model_id"] for r in json.loads((Path(bundle) / APP_CONFIG).read_text())["model_list"]]
