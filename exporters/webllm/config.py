"""Typed configuration of the WebLLM bundle exporter (imports nothing heavy).

A bundle holds one MLC weight folder per quantisation in ``quants`` (all checked against the
merged model by the NumPy reference) and one WebGPU model library per quantisation in
``libraries``. Quantisation facts live in ``exporters.webllm.quant.QUANTS``; the names are
mlc-llm's (bits, dtype, group scheme: ``q4f16_1`` = 4-bit, float16 model, group quantisation).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

# mlc-llm's names; kept here too so the config imports nothing (quant.py holds the codec facts)
QUANT_NAMES = ("q0f32", "q0f16", "q4f32_1", "q4f16_1")
F16_QUANTS = ("q0f16", "q4f16_1")  # float16 compute: WebGPU adapters with the 'shader-f16' feature only
COMPILERS = ("auto", "edgesmith", "mlc_llm")
F32_ENCODINGS = {  # tensor-cache record formats for float32 tensors (float16 ones are always raw)
    "raw": "lossless float32 bytes (WebLLM and TVM's runtime read them): the q0f32 copy is the merged model itself",
    "f32-to-bf16": "mlc-llm convert_weight's own choice, byte-identical folders at half the size; on SmolLM2 it "
                   "moved q0f32's logits by up to 0.23 (KL 9e-5)",
}
# WebLLM's prebuilt small models use a 4096 window and 1024/2048-token prefill chunks; the KV cache
# is allocated for the whole window up front (SmolLM2-135M f32: 30 layers x 2 x 3 heads x 64 x 4 B = 46 KB a token)
DEFAULT_CONTEXT_CAP = 4096
DEFAULT_PREFILL_CHUNK = 1024


def _quant_list(key: str, value, allow_empty: bool) -> tuple:
    values = (value,) if isinstance(value, str) else value
    if not isinstance(values, (list, tuple)) or (not values and not allow_empty):
        raise ValueError(f"`{key}` must be a {'' if allow_empty else 'non-empty '}list of "
                         f"{', '.join(map(repr, QUANT_NAMES))}, got {value!r}")
    for q in values:
        if q not in QUANT_NAMES:
            raise ValueError(f"`{key}` entry {q!r} is not an MLC quantisation this exporter writes; "
                             f"known: {', '.join(map(repr, QUANT_NAMES))}")
    if len(set(values)) != len(values):
        raise ValueError(f"`{key}` lists a quantisation twice: {list(values)!r}")
    return tuple(values)


def _positive_int(key: str, value, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{key}` must be a positive integer{' or null (the model’s own)' if allow_none else ''}, "
                         f"got {value!r}")


@dataclass(frozen=True)
class WebllmExportConfig:
    """`webllm` target options.

    ``quants``: the MLC weight folders written (each one checked by the NumPy reference).
    ``libraries``: the quantisations a WebGPU model library is compiled for (apache-tvm + emscripten,
    about 2 minutes each on 2 cores, cached by hash); default ``None`` = every one in ``quants``.
    A quantisation without a library still ships its weights: WebLLM's prebuilt library of the same
    architecture loads them.
    """

    quants: tuple = ("q4f16_1", "q4f32_1")
    libraries: object = None  # None: all of quants; a list (may be empty)
    context_window_size: int | None = None  # None: the model's, capped at DEFAULT_CONTEXT_CAP
    prefill_chunk_size: int | None = None  # None: min(context, DEFAULT_PREFILL_CHUNK)
    compiler: str = "auto"  # auto: mlc_llm's compiler when installed, else edgesmith's (apache-tvm)
    reference_check: bool = True  # NumPy forward over the MLC files against the merged model's logits
    reference_tokens: int = 256  # tokens of the quality text the check runs on (the reference stage's 256: all)
    conv_template: dict | None = None  # override the conversation template derived from the chat template
    f32_encoding: str = "raw"  # float32 tensors of q0f32/q4f32_1 on disk; see F32_ENCODINGS
    max_new_tokens: int = 256  # the chat page's reply budget
    model_id: str = "model"  # prefix of each WebLLM model_id: <model_id>-<quant>-MLC

    def __post_init__(self) -> None:
        object.__setattr__(self, "quants", _quant_list("quants", self.quants, allow_empty=False))
        libs = self.quants if self.libraries is None else _quant_list("libraries", self.libraries, allow_empty=True)
        stray = [q for q in libs if q not in self.quants]
        if stray:
            raise ValueError(f"`libraries` lists {stray!r}, which `quants` {list(self.quants)!r} does not write "
                             f"(fix: add them to quants or drop them from libraries)")
        object.__setattr__(self, "libraries", tuple(libs))
        _positive_int("context_window_size", self.context_window_size)
        _positive_int("prefill_chunk_size", self.prefill_chunk_size)
        _positive_int("reference_tokens", self.reference_tokens, allow_none=False)
        _positive_int("max_new_tokens", self.max_new_tokens, allow_none=False)
        if self.compiler not in COMPILERS:
            raise ValueError(f"`compiler` must be one of {', '.join(map(repr, COMPILERS))}, got {self.compiler!r}")
        if self.f32_encoding not in F32_ENCODINGS:
            raise ValueError(f"`f32_encoding` must be one of {', '.join(map(repr, F32_ENCODINGS))}, "
                             f"got {self.f32_encoding!r}")
        if not isinstance(self.reference_check, bool):
            raise ValueError(f"`reference_check` must be true or false, got {self.reference_check!r}")
        if self.conv_template is not None and not isinstance(self.conv_template, dict):
            raise ValueError(f"`conv_template` must be a mapping in mlc-chat-config.json's conv_template schema, "
                             f"got {type(self.conv_template).__name__}")
        if not isinstance(self.model_id, str) or not self.model_id or not all(
                c.isalnum() or c in "-_." for c in self.model_id) or self.model_id.startswith("."):
            raise ValueError(f"`model_id` must be a plain name (letters, digits, - _ .), got {self.model_id!r}")

    def mlc_model_id(self, quant: str) -> str:
        """WebLLM's model_id and the folder name under models/ (WebLLM's own naming: <name>-<quant>-MLC)."""
        return f"{self.model_id}-{quant}-MLC"

    def encoding(self, quant: str) -> str | None:
        """The tensor-cache encoding for ``quant``; None: the weights writer's (mlc-llm's label, no float32 inside)."""
        return None if quant in F16_QUANTS else self.f32_encoding

    def lib_name(self, quant: str) -> str:
        return f"{self.model_id}-{quant}-webgpu.wasm"

    @property
    def primary(self) -> str:
        """The quantisation the browser benchmark runs by default: the first f32 one with a library
        (a software WebGPU adapter has no shader-f16), else the first with a library."""
        f32 = [q for q in self.libraries if q not in F16_QUANTS]
        return (f32 or list(self.libraries) or list(self.quants))[0]

    @property
    def needs_imatrix(self) -> bool:
        return False

    @property
    def needs_calibration(self) -> bool:
        return False

    @property
    def gate_key(self) -> str:
        return self.primary

    @classmethod
    def gate_keys(cls) -> list[str]:
        """Each quantisation is checked (and gated) on its own files."""
        return list(QUANT_NAMES)

    @classmethod
    def coerce(cls, value: "WebllmExportConfig | dict | None") -> "WebllmExportConfig":
        from exporters import coerce_options

        return coerce_options(cls, value, "webllm export")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["quants"], d["libraries"] = list(self.quants), list(self.libraries)
        return d
