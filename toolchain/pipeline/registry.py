"""Every plug point, registered by name in one readable table each and imported lazily.

- ``EXPORTERS``: target formats. A row names its entry point, options class, the extra inputs it
  takes, its default benchmark runtimes, the gate tier of every precision it can write, and an
  optional report section.
- ``RUNTIMES``: what loads an exported target and benchmarks it in the shared schema.
- ``STAGES``: the pipeline's stages, in the order a plan walks them (``toolchain.pipeline.plan``).
- ``METHODS``: fine-tuning methods (``train.method``).

`edgesmith targets` reads these tables without importing any target module, so it works with no
extra installed. A duplicate name is refused when the table is built. How to add a row of each:
docs/architecture.md.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass, field

from toolchain.core.errors import EdgesmithError


def _resolve(dotted: str):
    module, _, attr = dotted.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Entry:
    name: str
    target: str  # "package.module:attribute"
    extra: str | None  # pip extra that installs what it needs: pip install 'edgesmith[extra]'
    requires: tuple[str, ...]  # importable modules it needs
    summary: str
    config: str | None = None  # "package.module:ConfigClass" validating the recipe's options (imports nothing heavy)
    needs: tuple[str, ...] = ()  # extra stage inputs passed to the exporter: calibration, imatrix, adapter, reference
    install: str | None = None  # how to install what it needs, when a pip extra is not enough
    tools: str | None = None  # "module:function" listing missing non-Python tools (node, chromium), each with its fix
    runtimes: tuple[str, ...] = ()  # exporters: the runtimes that benchmark a target by default
    gates: dict[str, str] = field(default_factory=dict)  # exporters: gate key (precision) -> tier in quality.gates
    report: str | None = None  # exporters: a module with collect(figures) -> row and section(rows, bench) -> section
    versions: tuple[str, ...] = ()  # distributions whose versions shape its output (keyed into the stage cache)

    def install_hint(self) -> str:
        if self.install:
            return self.install
        if self.tools:
            return "the fix is given beside each missing tool"
        return f"pip install 'edgesmith[{self.extra}]'" if self.extra else f"pip install {' '.join(self.missing())}"

    def missing_modules(self) -> list[str]:
        return [m for m in self.requires if importlib.util.find_spec(m) is None]

    def missing(self) -> list[str]:
        missing = self.missing_modules()
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

    def preflight(self):
        """The exporter module's ``preflight(model_dir, options)``, or None when it has none."""
        module = importlib.import_module(self.target.split(":")[0])
        return getattr(module, "preflight", None)


@dataclass(frozen=True)
class StageEntry:
    name: str  # the kind of the stages it plans (export also plans its targets' bench stages)
    target: str  # "module:function": plan(recipe, state) -> the stages it adds, none when the recipe lacks it
    summary: str
    section: str | None = None  # the recipe section that configures it
    # "module:Class" of that section when the stage brings its own (an optional recipe key of that name;
    # its module must import nothing heavy and the pipeline's recipe only under TYPE_CHECKING)
    section_class: str | None = None
    produces_model: bool = False  # its last stage's output is the model every later stage uses
    needs: tuple[str, ...] = ()  # shared inputs it makes the plan include (calibration, imatrix) when its section is set
    versions: tuple[str, ...] = ()  # distributions whose versions shape its output

    def load(self):
        return _resolve(self.target)


@dataclass(frozen=True)
class MethodEntry:
    name: str
    target: str  # "module:attribute": a toolchain.training.method.TrainingMethod
    summary: str
    requires: tuple[str, ...] = ()  # importable modules it needs
    extra: str | None = None  # pip extra that installs them: pip install 'edgesmith[extra]'

    def missing(self) -> list[str]:
        return [m for m in self.requires if importlib.util.find_spec(m) is None]

    def install_hint(self) -> str:
        return f"pip install 'edgesmith[{self.extra}]'" if self.extra else f"pip install {' '.join(self.missing())}"

    def load(self):
        missing = self.missing()
        if missing:
            raise EdgesmithError(f"training method {self.name!r} needs {', '.join(missing)}, which is not installed "
                                 f"(fix: {self.install_hint()})")
        return _resolve(self.target)


class Registry:
    def __init__(self, kind: str, rows: list):
        self.kind = kind
        self._entries: dict[str, object] = {}
        for row in rows:
            self.add(row)

    def add(self, entry) -> None:
        if entry.name in self._entries:
            raise EdgesmithError(f"{self.kind} {entry.name!r} is registered twice "
                                 f"({self._entries[entry.name].target} and {entry.target})")
        self._entries[entry.name] = entry

    def get(self, name: str):
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


LLAMA_CPP_INSTALL = "edgesmith setup llama-cpp (a portable llama-cpp-python build)"

# gate tiers (toolchain.quality.gates.TIERS) of each precision an exporter can write; the reasons and
# measured ranges are in the tiers themselves
ONNX_GATES = {"fp32": "EXACT", "fp16": "HALF_COMPUTE", "int8": "INT8", "int8-integer": "INT8_PER_TOKEN",
              "int8-static": "INT8_STATIC",
              "int4": "Q4_PLAIN", "int4f16": "Q4_PLAIN"}
WEBGPU_GATES = {"fp32": "EXACT", "fp16": "HALF_COMPUTE", "int8": "INT8_PER_TOKEN", "int4": "Q4_PLAIN",
                "int4f16": "Q4_PLAIN"}
GGUF_GATES = {"F32": "EXACT", "F16": "HALF", "BF16": "BF16", "Q8_0": "INT8", "Q6_K": "K6", "Q5_K_M": "K5",
              "Q5_0": "K5", "Q4_K_M": "Q4_GOOD", "IQ4_XS": "IQ4", "IQ4_NL": "IQ4", "Q4_0": "Q4_PLAIN",
              "Q4_1": "Q4_PLAIN", "Q3_K_M": "Q3_K", "Q2_K": "Q2_K"}
WEBLLM_GATES = {"q0f32": "EXACT", "q0f16": "HALF_COMPUTE", "q4f32_1": "MLC_Q4", "q4f16_1": "MLC_Q4"}

#                name            module:attribute                                  extra   needs
EXPORTERS = Registry("exporter", [
    Entry("onnx", "exporters.onnx:export", "onnx", ("onnx", "numpy"),
          "ONNX decoder with KV cache: fp32/fp16/int8/int4 (MatMulNBits), onnxruntime and onnxruntime-genai",
          config="exporters.onnx.config:OnnxExportConfig", needs=("calibration", "imatrix"),
          runtimes=("onnxruntime",), gates=ONNX_GATES, versions=("onnx", "onnxruntime")),
    Entry("gguf", "exporters.gguf.export:export", None, ("gguf", "llama_cpp"),
          "GGUF for llama.cpp: F32/F16/BF16 and llama.cpp's own quantiser (Q8_0 ... IQ4), optional imatrix",
          config="exporters.gguf.config:GgufExportConfig", needs=("imatrix",), install=LLAMA_CPP_INSTALL,
          runtimes=("llama.cpp",), gates=GGUF_GATES, versions=("gguf", "llama-cpp-python")),
    Entry("gguf-lora", "exporters.gguf.lora:export", None, ("gguf",),
          "the LoRA adapter as a GGUF adapter applied at load time over a base GGUF",
          config="exporters.gguf.config:GgufLoraConfig", needs=("adapter",), runtimes=("llama.cpp",),
          gates={"F32": "EXACT", "F16": "HALF", "BF16": "BF16"}, versions=("gguf", "peft")),
    # the native row runs the very file the wasm page loads: the browser-vs-native ratio. WebGPU is
    # listed by the recipe where a GPU exists: without one, chromium's SwiftShader takes minutes per token
    Entry("webgpu", "exporters.webgpu:export", "onnx", ("onnx", "numpy"),
          "browser bundle: transformers.js model folder (fp32/fp16/q8/q4/q4f16), chat page and vendored onnxruntime-web",
          config="exporters.webgpu.config:WebgpuExportConfig", needs=("imatrix",),
          install="pip install 'edgesmith[onnx]' and edgesmith setup web",
          tools="exporters.webgpu.vendor:missing_packages", runtimes=("browser-wasm", "onnxruntime"),
          gates=WEBGPU_GATES, versions=("onnx", "onnxruntime")),
    Entry("webllm", "exporters.webllm:export", "webllm", ("numpy", "tvm"),
          "WebLLM bundle: MLC weights (q0f32/q0f16/q4f32_1/q4f16_1) checked by a NumPy forward, mlc-chat-config.json, "
          "WebGPU model libraries compiled with apache-tvm + emscripten, chat page on @mlc-ai/web-llm",
          config="exporters.webllm.config:WebllmExportConfig", needs=("reference",),
          install="pip install 'edgesmith[webllm]', apt-get install emscripten and edgesmith setup web",
          tools="exporters.webllm.vendor:missing_packages", runtimes=("browser-webllm",), gates=WEBLLM_GATES,
          report="exporters.webllm.report", versions=("apache-tvm", "apache-tvm-ffi")),
])

RUNTIMES = Registry("runtime", [
    Entry("torch", "runtimes.torch_runtime:TorchRuntime", None, ("torch", "transformers"),
          "PyTorch + transformers on the merged model: the reference", versions=("torch", "transformers")),
    Entry("onnxruntime", "runtimes.onnxruntime_runtime:OnnxRuntime", "onnx", ("onnxruntime",),
          "onnxruntime CPU execution provider with a KV-cache loop", versions=("onnxruntime",)),
    Entry("onnxruntime-genai", "runtimes.onnxruntime_genai_runtime:OnnxGenaiRuntime", "onnx", ("onnxruntime_genai",),
          "onnxruntime-genai (what Android/iOS apps embed) on an ONNX folder with genai_config.json",
          versions=("onnxruntime-genai", "onnxruntime")),
    Entry("llama.cpp", "runtimes.llamacpp_runtime:LlamaCppRuntime", None, ("llama_cpp",),
          "llama.cpp through llama-cpp-python (CPU; GGUF models and GGUF LoRA adapters)", install=LLAMA_CPP_INSTALL,
          versions=("llama-cpp-python",)),
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

# In plan order. A row is one module (its plan(recipe, state) and the stage body) and this line.
TRAINING = ("torch", "transformers", "peft", "accelerate")
STAGES = Registry("stage", [
    StageEntry("data", "toolchain.stages.data:plan", "read, check and split the dataset", section="data"),
    StageEntry("model", "toolchain.stages.model:plan", "the base model as safetensors; targets' preflights",
               section="model", versions=("transformers", "gguf")),
    StageEntry("train", "toolchain.stages.train:plan", "fine-tune an adapter (train.method)", section="train",
               versions=TRAINING),
    StageEntry("merge", "toolchain.stages.merge:plan", "merge the adapter into a full-precision model",
               section="merge", produces_model=True, versions=TRAINING),
    # the calibration sample reads only the data and the tokenizer: before prune, which scores on it
    StageEntry("calibrate", "toolchain.stages.calibrate:plan", "calibration sample for quantisers and pruning",
               section="calibrate", versions=("transformers",)),
    StageEntry("prune", "toolchain.stages.prune:plan", "structured pruning of the merged model, healed by distillation",
               section="prune", section_class="toolchain.stages.prune:PruneSection", produces_model=True,
               needs=("calibration",), versions=TRAINING),
    StageEntry("eval", "toolchain.stages.eval:plan", "task metric before/after", section="eval",
               versions=("torch", "transformers")),
    StageEntry("reference", "toolchain.stages.reference:plan", "reference logits and greedy outputs",
               section="bench", versions=("torch", "transformers")),
    StageEntry("imatrix", "toolchain.stages.imatrix:plan", "importance matrix on the calibration sample",
               versions=("torch", "transformers")),
    StageEntry("bench-reference", "toolchain.stages.bench:plan", "the reference model benchmarked on torch",
               section="bench"),
    StageEntry("export", "toolchain.stages.export:plan", "each target exported, then benchmarked on its runtimes",
               section="targets"),
    StageEntry("report", "toolchain.stages.report:plan", "report.json / .md / .html", section="report"),
])

METHODS = Registry("training method", [
    MethodEntry("lora", "toolchain.training.lora:METHOD", "LoRA adapters on the full-precision base (peft); DoRA and rsLoRA as options"),
    MethodEntry("qlora", "toolchain.training.qlora:METHOD", "LoRA adapters on a 4-bit (NF4/FP4) base (peft + bitsandbytes)",
                requires=("bitsandbytes",), extra="qlora"),
    MethodEntry("hft", "toolchain.training.hft:METHOD",
                "half fine-tuning: full-parameter training of half the matrices, redrawn each round (arXiv 2404.18466)"),
])


def target_config(target):
    """A recipe target's options as its exporter's options dataclass (None when it has none)."""
    cls = EXPORTERS.get(target.format).config_class()
    return cls(**target.options) if cls else None


def distribution_versions(names) -> dict[str, str]:
    """Installed versions of ``names`` (PyPI distributions); absent ones are left out."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out
