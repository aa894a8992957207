"""Exporters and runtimes, registered by name in one readable table and imported lazily.

`edgesmith targets` reads these tables without importing any target module, so it works with
no extra installed. A duplicate name is refused when the table is built.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

from toolchain.errors import EdgesmithError


@dataclass(frozen=True)
class Entry:
    name: str
    target: str  # "package.module:attribute"
    extra: str | None  # pip extra that installs what it needs: pip install 'edgesmith[extra]'
    requires: tuple[str, ...]  # importable modules it needs
    summary: str
    config: str | None = None  # "package.module:ConfigClass" validating the recipe's options
    needs: tuple[str, ...] = ()  # extra stage inputs passed to the exporter: calibration, imatrix, adapter
    install: str | None = None  # how to install what it needs, when a pip extra is not enough
    tools: str | None = None  # "module:function" listing missing non-Python tools (node, chromium), each with its fix

    def install_hint(self) -> str:
        if self.install:
            return self.install
        if self.tools:
            return "the fix is given beside each missing tool"
        return f"pip install 'edgesmith[{self.extra}]'" if self.extra else f"pip install {' '.join(self.missing())}"

    def missing(self) -> list[str]:
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if not missing and self.tools:
            missing += _resolve(self.tools)()
        return missing

    def installed(self) -> bool:
        return not self.missing()

    def load(self):
        missing = self.missing()
        if missing:
            hint = self.install_hint()
            raise EdgesmithError(f"{self.name!r} needs {', '.join(missing)}, which is not installed (fix: {hint})")
        return _resolve(self.target)

    def config_class(self):
        """The options dataclass (its module must import nothing heavy), or None."""
        return _resolve(self.config) if self.config else None


def _resolve(dotted: str):
    module, _, attr = dotted.partition(":")
    return getattr(importlib.import_module(module), attr)


class Registry:
    def __init__(self, kind: str, rows: list[Entry]):
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        for row in rows:
            self.add(row)

    def add(self, entry: Entry) -> None:
        if entry.name in self._entries:
            raise EdgesmithError(f"{self.kind} {entry.name!r} is registered twice "
                                 f"({self._entries[entry.name].target} and {entry.target})")
        self._entries[entry.name] = entry

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise EdgesmithError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._entries))}") from None

    def names(self) -> list[str]:
        return list(self._entries)

    def __iter__(self):
        return iter(self._entries.values())

    def __contains__(self, name: str) -> bool:
        return name in self._entries


#                name            module:attribute                                  extra   needs
EXPORTERS = Registry("exporter", [
    Entry("onnx", "exporters.onnx:export", "onnx", ("onnx", "numpy"),
          "ONNX decoder with KV cache: fp32/fp16/int8/int4 (MatMulNBits), onnxruntime and onnxruntime-genai",
          config="exporters.onnx.config:OnnxExportConfig", needs=("calibration", "imatrix")),
    Entry("gguf", "exporters.gguf.export:export", None, ("gguf", "llama_cpp"),
          "GGUF for llama.cpp: F32/F16/BF16 and llama.cpp's own quantiser (Q8_0 ... IQ4), optional imatrix",
          config="exporters.gguf.config:GgufExportConfig", needs=("imatrix",), install="edgesmith setup llama-cpp (a portable llama-cpp-python build)"),
    Entry("gguf-lora", "exporters.gguf.lora:export", None, ("gguf",),
          "the LoRA adapter as a GGUF adapter applied at load time over a base GGUF",
          config="exporters.gguf.config:GgufLoraConfig", needs=("adapter",)),
    Entry("webgpu", "exporters.webgpu:export", "onnx", ("onnx", "numpy"),
          "browser bundle: transformers.js model folder (fp32/fp16/q8/q4/q4f16), chat page and vendored onnxruntime-web",
          config="exporters.webgpu.config:WebgpuExportConfig", needs=("imatrix",),
          install="pip install 'edgesmith[onnx]' and edgesmith setup web",
          tools="exporters.webgpu.vendor:missing_packages"),
    Entry("webllm", "exporters.webllm:export", "webllm", ("numpy", "tvm"),
          "WebLLM bundle: MLC weights (q0f32/q0f16/q4f32_1/q4f16_1) checked by a NumPy forward, mlc-chat-config.json, "
          "WebGPU model libraries compiled with apache-tvm + emscripten, chat page on @mlc-ai/web-llm",
          config="exporters.webllm.config:WebllmExportConfig", needs=("reference",),
          install="pip install 'edgesmith[webllm]', apt-get install emscripten and edgesmith setup web",
          tools="exporters.webllm.vendor:missing_packages"),
])

RUNTIMES = Registry("runtime", [
    Entry("torch", "runtimes.torch_runtime:TorchRuntime", None, ("torch", "transformers"),
          "PyTorch + transformers on the merged model: the reference"),
    Entry("onnxruntime", "runtimes.onnxruntime_runtime:OnnxRuntime", "onnx", ("onnxruntime",),
          "onnxruntime CPU execution provider with a KV-cache loop"),
    Entry("onnxruntime-genai", "runtimes.onnxruntime_genai_runtime:OnnxGenaiRuntime", "onnx", ("onnxruntime_genai",),
          "onnxruntime-genai (what Android/iOS apps embed) on an ONNX folder with genai_config.json"),
    Entry("llama.cpp", "runtimes.llamacpp_runtime:LlamaCppRuntime", None, ("llama_cpp",),
          "llama.cpp through llama-cpp-python (CPU; GGUF models and GGUF LoRA adapters)", install="edgesmith setup llama-cpp (a portable llama-cpp-python build)"),
    Entry("browser-wasm", "runtimes.browser_runtime:BrowserWasmRuntime", None, ("numpy",),
          "a browser bundle in headless chromium on onnxruntime-web's wasm backend (threads: cross-origin isolated)",
          tools="runtimes.browser_runtime:missing_tools"),
    Entry("browser-webgpu", "runtimes.browser_runtime:BrowserWebgpuRuntime", None, ("numpy",),
          "a browser bundle in headless chromium on WebGPU (--enable-unsafe-webgpu; software adapter without a GPU)",
          tools="runtimes.browser_runtime:missing_tools"),
    Entry("browser-webllm", "runtimes.webllm_runtime:BrowserWebllmRuntime", None, ("numpy",),
          "a WebLLM bundle in headless chromium through @mlc-ai/web-llm's engine on WebGPU (software adapter "
          "without a GPU: f32 quantisations only)", tools="runtimes.webllm_runtime:missing_tools"),
])

# Which runtimes can run each exporter's output by default.
DEFAULT_RUNTIMES = {
    "onnx": ["onnxruntime"],
    "gguf": ["llama.cpp"],
    "gguf-lora": ["llama.cpp"],
    # the native row runs the very file the wasm page loads: the browser-vs-native ratio. WebGPU is
    # listed by the recipe where a GPU exists: without one, chromium's SwiftShader takes minutes per token
    "webgpu": ["browser-wasm", "onnxruntime"],
    "webllm": ["browser-webllm"],
}
