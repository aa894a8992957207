"""Typed configuration of the ONNX exporter, validated when it is built (imports nothing heavy)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Precision:
    """How one precision stores weights and computes activations in the exported graph."""

    name: str
    weight_dtype: type  # numpy dtype of float weights (norms, embeddings; every linear when bits is None)
    compute_dtype: type  # numpy dtype of activations, logits and the KV cache
    mask_value: float  # large finite negative used to mask attention (never -inf: NaN on empty rows)
    bits: int | None  # linear layers block-quantised to this many bits (MatMulNBits), or plain floats
    summary: str

    @property
    def compute_elem_type(self) -> int:
        """The ONNX element type of ``compute_dtype`` (onnx is imported here, not when options are validated)."""
        from onnx import helper

        return helper.np_dtype_to_tensor_dtype(np.dtype(self.compute_dtype))


PRECISIONS: dict[str, Precision] = {
    "fp32": Precision("fp32", np.float32, np.float32, float(np.finfo(np.float32).min), None,
                      "float32 weights and activations: the reference export"),
    "fp16": Precision("fp16", np.float16, np.float16, float(np.finfo(np.float16).min), None,
                      "float16 weights, activations and KV cache (GPU / mobile NPU friendly, half the size)"),
    "int8": Precision("int8", np.float32, np.float32, float(np.finfo(np.float32).min), 8,
                      "int8 block-quantised linear layers; activations quantised to int8 at run time "
                      "(dynamic) or with calibrated ranges (static)"),
    "int4": Precision("int4", np.float32, np.float32, float(np.finfo(np.float32).min), 4,
                      "int4 block-quantised linear layers (MatMulNBits), float32 activations"),
    "int4f16": Precision("int4f16", np.float16, np.float16, float(np.finfo(np.float16).min), 4,
                         "int4 block-quantised linear layers with float16 scales, activations and KV cache "
                         "(transformers.js q4f16: WebGPU with shader-f16)"),
}

GRAPHS = {
    "fused": "onnxruntime contrib kernels: GroupQueryAttention with rotary, SimplifiedLayerNormalization, "
             "SkipSimplifiedLayerNormalization, MatMulNBits (fast on onnxruntime and onnxruntime-genai)",
    "standard": "standard ONNX ops only (any ONNX runtime); float precisions only",
}
# MatMulNBits accuracy_level: the minimum precision its kernel computes in
ACCURACY_LEVELS = {0: "unset (kernel default)", 1: "fp32", 2: "fp16", 3: "bf16", 4: "int8 (fastest on CPU)"}
ACTIVATIONS_INT8 = ("dynamic", "static")
INT8_KERNELS = {
    "nbits": "MatMulNBits 8-bit blocks (native onnxruntime's fastest int8)",
    "integer": "per-channel int8 weights in [-64, 64] (no int16 saturation on x86 CPUs without VNNI), per-token "
               "int8 activations, MatMulInteger (standard ONNX ops; what onnxruntime-web runs, and transformers.js "
               "q8 files use)",
}
LM_HEAD = {
    "auto": "int8 for int8 and int4 precisions, the precision's float type otherwise",
    "int8": "int8 blocks (MatMulNBits)",
    "int4": "int4 blocks: smallest and fastest; costs the most quality on a small model",
    "float": "the precision's float type (float32 for int8/int4)",
}

# The graph uses opset 17 by default, what onnxruntime-web and transformers.js run; later
# opsets only change how Reduce ops take their axes, which the graph builder handles.
MIN_OPSET = 17
MAX_OPSET = 21


@dataclass(frozen=True)
class OnnxExportConfig:
    """`onnx` target options. Quantisation options apply to int8 / int4 only."""

    precision: str = "fp32"
    graph: str = "fused"
    opset: int = 17
    block_size: int = 32  # values per quantisation block along the input dimension (16..256, power of two)
    symmetric: bool = True  # False: a zero point per block (asymmetric)
    accuracy_level: int = 4  # MatMulNBits compute precision, see ACCURACY_LEVELS
    lm_head: str = "auto"  # the vocab projection (the largest matrix of a small model): see LM_HEAD
    quantize_embedding: bool = False  # embedding table block-quantised too (GatherBlockQuantized)
    imatrix: bool = False  # weight the int8/int4 scale search by the run's importance matrix
    activations: str = "dynamic"  # int8 only: activation scales at run time, or from calibration data
    int8_kernel: str = "nbits"  # 8-bit linears (int8 precision, int8 LM head): see INT8_KERNELS
    genai: bool | None = None  # write genai_config.json (onnxruntime-genai / mobile apps); default: when the
    # model folder has its tokenizer files

    def __post_init__(self) -> None:
        def choice(key, value, options):
            if value not in options:
                raise ValueError(f"`{key}` must be one of {', '.join(map(repr, options))}, got {value!r}")

        def flag(key, value):
            if not isinstance(value, bool):
                raise ValueError(f"`{key}` must be true or false, got {value!r}")

        choice("precision", self.precision, PRECISIONS)
        choice("graph", self.graph, GRAPHS)
        choice("accuracy_level", self.accuracy_level, ACCURACY_LEVELS)
        choice("activations", self.activations, ACTIVATIONS_INT8)
        choice("lm_head", self.lm_head, LM_HEAD)
        choice("int8_kernel", self.int8_kernel, INT8_KERNELS)
        if self.int8_kernel == "integer" and self.activations == "static":
            raise ValueError("`int8_kernel: integer` quantises activations at run time; `activations: static` "
                             "uses its own kernel (MatMulIntegerToFloat): set one or the other")
        if self.lm_head in ("int8", "int4") and self.spec.bits is None:
            raise ValueError(f"`lm_head: {self.lm_head}` needs precision int8 or int4 (MatMulNBits), got "
                             f"{self.precision!r}; use `lm_head: auto`")
        for key in ("symmetric", "quantize_embedding", "imatrix"):
            flag(key, getattr(self, key))
        if self.genai is not None:
            flag("genai", self.genai)
        if isinstance(self.opset, bool) or not isinstance(self.opset, int) or not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise ValueError(f"`opset` must be an integer from {MIN_OPSET} to {MAX_OPSET}, got {self.opset!r}")
        b = self.block_size
        if isinstance(b, bool) or not isinstance(b, int) or not 16 <= b <= 256 or b & (b - 1):
            raise ValueError(f"`block_size` must be 16, 32, 64, 128 or 256, got {b!r}")
        if self.spec.bits is not None and self.graph != "fused":
            raise ValueError(f"precision {self.precision!r} uses MatMulNBits, an onnxruntime kernel: it needs "
                             f"`graph: fused`, got {self.graph!r}")
        if self.imatrix and self.spec.bits is None:
            raise ValueError(f"`imatrix: true` applies to int8 and int4 only, got precision {self.precision!r}")
        if self.activations == "static" and self.precision != "int8":
            raise ValueError(f"`activations: static` applies to precision int8 only, got {self.precision!r}")

    @property
    def spec(self) -> Precision:
        return PRECISIONS[self.precision]

    @property
    def lm_head_bits(self) -> int | None:
        """Bits of the quantised LM head, or None for a float one."""
        if self.spec.bits is None or self.lm_head == "float":
            return None
        return {"auto": 8, "int8": 8, "int4": 4}[self.lm_head]

    @property
    def writes_genai(self) -> bool:
        return self.genai is not False

    @property
    def needs_calibration(self) -> bool:
        return self.activations == "static"

    @property
    def needs_imatrix(self) -> bool:
        return self.imatrix

    @property
    def gate_key(self) -> str:
        """What its export is judged as (toolchain.quality.gates, via the exporter table's ``gates``): the
        precision, except that int8 through MatMulInteger quantises activations per token, not per block,
        and static int8 uses one calibrated range per linear."""
        if self.precision == "int8" and self.activations == "static":
            return "int8-static"
        return "int8-integer" if self.precision == "int8" and self.int8_kernel == "integer" else self.precision

    @classmethod
    def gate_keys(cls) -> list[str]:
        """Every gate key these options can produce."""
        return [*PRECISIONS, "int8-integer", "int8-static"]

    @classmethod
    def coerce(cls, value: "OnnxExportConfig | dict | None") -> "OnnxExportConfig":
        """Accept a config, a plain dict from a recipe, or None (defaults)."""
        from exporters import coerce_options

        return coerce_options(cls, value, "ONNX export")

    def to_dict(self) -> dict:
        return asdict(self)
