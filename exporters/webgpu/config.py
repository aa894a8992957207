"""Typed configuration of the browser bundle exporter (imports nothing heavy).

A bundle holds one ONNX file per transformers.js dtype listed in ``dtypes``; the page picks the
first one the device can run (``bundle.json``). Format facts live in the ``DTYPES`` table.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class Dtype:
    """One transformers.js dtype: the file it loads and how edgesmith's ONNX exporter writes it."""

    name: str
    suffix: str  # transformers.js v3 DEFAULT_DTYPE_SUFFIX_MAPPING: model{suffix}.onnx
    precision: str | None  # exporters.onnx precision that writes it; None: not writable for the browser
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
    "q8": Dtype("q8", "_quantized", None, False,
                "not written: onnxruntime-web 1.22 refuses MatMulNBits bits=8 at session creation (measured)"),
}
GRAPHS = ("fused", "standard")
LM_HEAD = {
    "auto": "int4 for q4/q4f16 (onnxruntime-web has no 8-bit MatMulNBits), float otherwise",
    "int4": "int4 blocks (MatMulNBits bits=4)",
    "float": "the dtype's float type: larger, closest to the merged model",
}
EXTERNAL_DATA = ("auto", True, False)
# auto: weights go to "<file>_data" once the tensors pass this size. Below it one .onnx file is one
# fetch; above it protobuf's 2 GiB message limit and large-ArrayBuffer limits start to matter.
EXTERNAL_DATA_AUTO_BYTES = 512 * 2**20
# one external data file at most this large (transformers.js fetches "<file>_data", "_data_1", ...
# each into one ArrayBuffer; browsers cap those near 2 GiB)
CHUNK_BYTES = 1536 * 2**20


@dataclass(frozen=True)
class WebgpuExportConfig:
    """`webgpu` target options: which dtypes the bundle holds and how the ONNX files are written."""

    dtypes: tuple = ("q4",)  # transformers.js dtypes, in order of preference (see DTYPES)
    graph: str = "fused"  # ONNX graph kind (exporters.onnx GRAPHS); fused runs on wasm and WebGPU
    block_size: int = 32  # q4/q4f16: values per quantisation block
    symmetric: bool = True  # q4/q4f16: false adds a zero point per block
    lm_head: str = "auto"  # q4/q4f16: see LM_HEAD
    imatrix: bool = False  # q4/q4f16: weight the scale search by the run's importance matrix
    external_data: object = "auto"  # weights in "<file>_data": auto (when large), true or false
    max_new_tokens: int = 256  # the chat page's reply budget
    model_id: str = "model"  # folder name under models/ (what transformers.js from_pretrained loads)

    def __post_init__(self) -> None:
        dtypes = self.dtypes
        if isinstance(dtypes, str):
            dtypes = (dtypes,)
        if not isinstance(dtypes, (list, tuple)) or not dtypes:
            raise ValueError(f"`dtypes` must be a non-empty list of {', '.join(map(repr, DTYPES))}, got {self.dtypes!r}")
        for d in dtypes:
            if d not in DTYPES:
                raise ValueError(f"`dtypes` entry {d!r} is not a transformers.js dtype this exporter knows; "
                                 f"known: {', '.join(map(repr, DTYPES))}")
            if DTYPES[d].precision is None:
                raise ValueError(f"`dtypes` entry {d!r} cannot be written for the browser: {DTYPES[d].note} "
                                 f"(fix: use q4, or fp32)")
        if len(set(dtypes)) != len(dtypes):
            raise ValueError(f"`dtypes` lists a dtype twice: {list(dtypes)!r}")
        if all(DTYPES[d].shader_f16 for d in dtypes):
            raise ValueError(f"`dtypes` {list(dtypes)!r} all need WebGPU's shader-f16, so wasm and adapters "
                             f"without it would have no model (fix: add a fallback, e.g. [{dtypes[0]}, q4])")
        object.__setattr__(self, "dtypes", tuple(dtypes))
        if self.graph not in GRAPHS:
            raise ValueError(f"`graph` must be one of {', '.join(map(repr, GRAPHS))}, got {self.graph!r}")
        if self.graph == "standard" and any(DTYPES[d].precision.startswith("int4") for d in dtypes):
            raise ValueError("`graph: standard` has no int4 linears (MatMulNBits is an onnxruntime kernel) "
                             "(fix: graph: fused for q4/q4f16)")
        if self.lm_head not in LM_HEAD:
            raise ValueError(f"`lm_head` must be one of {', '.join(map(repr, LM_HEAD))}, got {self.lm_head!r} "
                             f"(int8 heads are refused by onnxruntime-web 1.22)")
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
        return opts

    def device_dtypes(self) -> dict[str, list[str]]:
        """bundle.json's preference lists: WebGPU tries every dtype (f16 ones only with shader-f16);
        wasm only those without float16 compute."""
        return {"webgpu": list(self.dtypes), "wasm": [d for d in self.dtypes if not DTYPES[d].shader_f16]}

    @property
    def primary(self) -> str:
        """The dtype wasm runs (and native onnxruntime is compared on): the first without f16 compute."""
        return self.device_dtypes()["wasm"][0]

    @property
    def needs_imatrix(self) -> bool:
        return self.imatrix

    @property
    def needs_calibration(self) -> bool:
        return False

    @classmethod
    def coerce(cls, value: "WebgpuExportConfig | dict | None") -> "WebgpuExportConfig":
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            known = [f.name for f in fields(cls)]
            unknown = sorted(set(value) - set(known))
            if unknown:
                raise ValueError(f"unknown webgpu export option(s) {', '.join(map(repr, unknown))}; "
                                 f"known: {', '.join(map(repr, known))}")
            return cls(**value)
        raise TypeError(f"webgpu export config must be a WebgpuExportConfig, a dict or None, got {type(value).__name__}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dtypes"] = list(self.dtypes)
        return d
