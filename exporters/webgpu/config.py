"""Typed configuration of the browser bundle exporter (imports nothing heavy).

A bundle holds one ONNX file per transformers.js dtype listed in ``webgpu`` or ``wasm``; the page
picks the first one of its device's list it can run (``bundle.json``). Format facts live in the ``DTYPES`` table.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Dtype:
    """One transformers.js dtype: the file it loads and how edgesmith's ONNX exporter writes it."""

    name: str
    suffix: str  # transformers.js v3 DEFAULT_DTYPE_SUFFIX_MAPPING: model{suffix}.onnx
    precision: str  # exporters.onnx precision that writes it
    shader_f16: bool  # float16 compute: WebGPU only on an adapter with the 'shader-f16' feature
    note: str


DTYPES: dict[str, Dtype] = {
    "fp32": Dtype("fp32", "", "fp32", False, "float32 weights and compute: the exact reference, 4 bytes a weight"),
    "fp16": Dtype("fp16", "_fp16", "fp16", True,
                  "float16 weights, compute and KV cache; WebGPU with shader-f16 only (wasm has no fp16 kernels)"),
    "q4": Dtype("q4", "_q4", "int4", False,
                "int4 block-quantised linears (MatMulNBits bits=4), float32 compute: wasm and every WebGPU adapter"),
    "q4f16": Dtype("q4f16", "_q4f16", "int4f16", True,
                   "int4 block-quantised linears with float16 compute; WebGPU with shader-f16 only"),
    "q8": Dtype("q8", "_quantized", "int8", False,
                "int8 per-channel linears through DynamicQuantizeLinear + MatMulInteger (onnxruntime-web 1.22 "
                "refuses 8-bit MatMulNBits): wasm's integer SIMD kernels; WebGPU runs them on the CPU"),
}
GRAPHS = ("fused", "standard")
LM_HEAD = {
    "auto": "the dtype's own: int4 for q4/q4f16 (onnxruntime-web has no 8-bit MatMulNBits), int8 for q8, "
            "float otherwise",
    "int4": "int4 blocks (MatMulNBits bits=4) for q4/q4f16 (q8 keeps its int8 head)",
    "float": "the dtype's float type: larger, closest to the merged model",
}
EXTERNAL_DATA = ("auto", True, False)
# auto: weights go to "<file>_data" once the tensors pass this size. Below it one .onnx file is one
# fetch; above it protobuf's 2 GiB message limit and large-ArrayBuffer limits start to matter.
EXTERNAL_DATA_AUTO_BYTES = 512 * 2**20
# one external data file at most this large (transformers.js fetches "<file>_data", "_data_1", ...
# each into one ArrayBuffer; browsers cap those near 2 GiB)
CHUNK_BYTES = 1536 * 2**20


def _dtype_list(key: str, value) -> tuple:
    values = (value,) if isinstance(value, str) else value
    if not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"`{key}` must be a non-empty list of {', '.join(map(repr, DTYPES))}, got {value!r}")
    for d in values:
        if d not in DTYPES:
            raise ValueError(f"`{key}` entry {d!r} is not a transformers.js dtype this exporter knows; "
                             f"known: {', '.join(map(repr, DTYPES))}")
    if len(set(values)) != len(values):
        raise ValueError(f"`{key}` lists a dtype twice: {list(values)!r}")
    return tuple(values)


@dataclass(frozen=True)
class WebgpuExportConfig:
    """`webgpu` target options: the dtypes each device loads, and how the ONNX files are written.

    Defaults follow transformers.js' own (q8 on wasm) and measured speed here: on wasm, q4 decodes
    ~35x slower than q8 (onnxruntime-web has no wasm MatMulNBits kernel: it dequantises the whole
    matrix on every call), while WebGPU runs MatMulNBits natively in a shader.
    """

    webgpu: tuple = ("q4f16", "q4")  # what WebGPU loads, in order of preference (f16 ones need shader-f16)
    wasm: tuple = ("q8",)  # what wasm loads (no WebGPU adapter), in order of preference
    graph: str = "fused"  # ONNX graph kind (exporters.onnx GRAPHS); fused runs on wasm and WebGPU
    block_size: int = 32  # q4/q4f16: values per quantisation block
    symmetric: bool = True  # q4/q4f16: false adds a zero point per block
    lm_head: str = "auto"  # see LM_HEAD
    imatrix: bool = False  # q4/q4f16: weight the scale search by the run's importance matrix
    external_data: object = "auto"  # weights in "<file>_data": auto (when large), true or false
    max_new_tokens: int = 256  # the chat page's reply budget
    model_id: str = "model"  # folder name under models/ (what transformers.js from_pretrained loads)

    def __post_init__(self) -> None:
        webgpu, wasm = _dtype_list("webgpu", self.webgpu), _dtype_list("wasm", self.wasm)
        object.__setattr__(self, "webgpu", webgpu)
        object.__setattr__(self, "wasm", wasm)
        if all(DTYPES[d].shader_f16 for d in webgpu):
            raise ValueError(f"`webgpu` {list(webgpu)!r} all need shader-f16, so adapters without it would have no "
                             f"model (fix: add a fallback, e.g. [{webgpu[0]}, q4])")
        f16 = [d for d in wasm if DTYPES[d].shader_f16]
        if f16:
            raise ValueError(f"`wasm` lists {f16!r}: float16 compute has no onnxruntime-web wasm kernels "
                             f"(fix: q8, fp32 or q4 for wasm)")
        if self.graph not in GRAPHS:
            raise ValueError(f"`graph` must be one of {', '.join(map(repr, GRAPHS))}, got {self.graph!r}")
        if self.graph == "standard" and any(DTYPES[d].precision.startswith("int") for d in self.dtypes):
            raise ValueError("`graph: standard` writes float linears only (fix: graph: fused for q4/q4f16/q8)")
        if self.lm_head not in LM_HEAD:
            raise ValueError(f"`lm_head` must be one of {', '.join(map(repr, LM_HEAD))}, got {self.lm_head!r} "
                             f"(an 8-bit MatMulNBits head is refused by onnxruntime-web 1.22)")
        for key in ("symmetric", "imatrix"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"`{key}` must be true or false, got {getattr(self, key)!r}")
        if self.external_data not in EXTERNAL_DATA or isinstance(self.external_data, int) and \
                not isinstance(self.external_data, bool):
            raise ValueError(f"`external_data` must be auto, true or false, got {self.external_data!r}")
        b = self.block_size
        if isinstance(b, bool) or not isinstance(b, int) or not 16 <= b <= 256 or b & (b - 1):
            raise ValueError(f"`block_size` must be 16, 32, 64, 128 or 256, got {b!r}")
        m = self.max_new_tokens
        if isinstance(m, bool) or not isinstance(m, int) or m <= 0:
            raise ValueError(f"`max_new_tokens` must be a positive integer, got {m!r}")
        if not isinstance(self.model_id, str) or not self.model_id or not all(
                c.isalnum() or c in "-_." for c in self.model_id) or self.model_id.startswith("."):
            raise ValueError(f"`model_id` must be a plain folder name (letters, digits, - _ .), got {self.model_id!r}")

    @property
    def dtypes(self) -> tuple:
        """Every dtype the bundle holds (one ONNX file each): WebGPU's, then wasm's."""
        return tuple(dict.fromkeys((*self.webgpu, *self.wasm)))

    # -- derived ---------------------------------------------------------------------------------
    def onnx_options(self, dtype: str) -> dict:
        """The exporters.onnx options that write ``dtype`` for onnxruntime-web.

        accuracy_level 0: native onnxruntime's level 4 quantises activations to int8, which
        onnxruntime-web's kernels never do, so the same file would compute differently in the
        browser and natively (measured: greedy diverges at token 12 on the tiny test model).
        """
        precision = DTYPES[dtype].precision
        opts = {"precision": precision, "graph": self.graph, "genai": False}
        if precision.startswith("int4"):
            opts.update(block_size=self.block_size, symmetric=self.symmetric, accuracy_level=0,
                        lm_head="float" if self.lm_head == "float" else "int4", imatrix=self.imatrix)
        elif precision == "int8":
            opts.update(int8_kernel="integer", lm_head="float" if self.lm_head == "float" else "auto")
        return opts

    def device_dtypes(self) -> dict[str, list[str]]:
        """bundle.json's preference lists (the page skips f16 dtypes on an adapter without shader-f16)."""
        return {"webgpu": list(self.webgpu), "wasm": list(self.wasm)}

    @property
    def primary(self) -> str:
        """The dtype wasm runs, which native onnxruntime is compared on."""
        return self.wasm[0]

    @property
    def needs_imatrix(self) -> bool:
        return self.imatrix

    @property
    def needs_calibration(self) -> bool:
        return False

    @property
    def gate_key(self) -> str:
        """The precision of the dtype native onnxruntime is compared on; a browser row reports its own."""
        return DTYPES[self.primary].precision

    @classmethod
    def gate_keys(cls) -> list[str]:
        return sorted({d.precision for d in DTYPES.values()})

    @classmethod
    def coerce(cls, value: "WebgpuExportConfig | dict | None") -> "WebgpuExportConfig":
        """Accept a config, a plain dict from a recipe, or None (defaults)."""
        from exporters import coerce_options

        return coerce_options(cls, value, "webgpu export")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["webgpu"], d["wasm"] = list(self.webgpu), list(self.wasm)
        return d
