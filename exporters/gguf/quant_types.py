"""The GGUF quantisation types edgesmith offers, as llama.cpp's quantiser names them.

Each entry maps the user-facing name (``Q4_K_M``) to the ``LLAMA_FTYPE_MOSTLY_*`` value in
``llama.h`` (the file type handed to ``llama_model_quantize``), the ggml tensor type most weights
get, and how an importance matrix figures in it. The enum values are copied from ``llama.h`` of
llama.cpp as vendored by llama-cpp-python 0.3.36 so that this table imports without llama_cpp;
the tests check them against ``llama_cpp.LLAMA_FTYPE_*``.

Bits per weight are nominal: those of the main tensor type's block layout. Real files differ:
"_M" mixes give some tensors a larger type, the token embedding / output matrix often gets
Q6_K or Q8_0, 1-d tensors (norms) stay F32, and a tensor whose row length is not a multiple of a
256-element K-quant block falls back to a 32-element type (SmolLM2's hidden size 576 does).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from toolchain.core.errors import PreflightError


class Imatrix(str, Enum):
    """How the quantiser uses an importance matrix for this type."""

    IGNORED = "ignored"  # the codec takes no weights (float types, Q8_0)
    USED = "used"  # weighted rounding when given; small gain expected
    RECOMMENDED = "recommended"  # the low-bit codecs where it matters most
    REQUIRED = "required"  # llama.cpp refuses to quantise without one (IQ1/IQ2/IQ3_XXS, Q2_K_S)


@dataclass(frozen=True)
class GgmlBlock:
    """A ggml tensor type's block layout: elements per block and bytes per block (ggml-common.h)."""

    name: str
    elements: int
    nbytes: int

    @property
    def bits_per_weight(self) -> float:
        return self.nbytes * 8 / self.elements


# ggml_type name -> block layout (ggml-common.h block_* structs; QK_K = 256)
GGML_BLOCKS: dict[str, GgmlBlock] = {b.name: b for b in (
    GgmlBlock("F32", 1, 4),
    GgmlBlock("F16", 1, 2),
    GgmlBlock("BF16", 1, 2),
    GgmlBlock("Q8_0", 32, 2 + 32),  # d (f16) + 32 int8
    GgmlBlock("Q6_K", 256, 128 + 64 + 16 + 2),  # ql, qh, int8 scales, d
    GgmlBlock("Q5_K", 256, 4 + 12 + 32 + 128),  # d, dmin, 6-bit scales, qh, qs
    GgmlBlock("Q5_0", 32, 2 + 4 + 16),  # d, qh, qs
    GgmlBlock("Q5_1", 32, 4 + 4 + 16),  # d, m, qh, qs
    GgmlBlock("Q4_K", 256, 4 + 12 + 128),  # d, dmin, 6-bit scales, qs
    GgmlBlock("Q4_0", 32, 2 + 16),
    GgmlBlock("Q4_1", 32, 4 + 16),
    GgmlBlock("IQ4_NL", 32, 2 + 16),  # d + 4-bit indices into a non-linear grid
    GgmlBlock("IQ4_XS", 256, 2 + 2 + 4 + 128),  # d, scales_h, scales_l, qs
    GgmlBlock("Q3_K", 256, 32 + 64 + 12 + 2),  # hmask, qs, scales, d
    GgmlBlock("Q2_K", 256, 16 + 64 + 2 + 2),  # scales, qs, d, dmin
)}


@dataclass(frozen=True)
class QuantType:
    """One quantisation type offered for GGUF export."""

    name: str  # as llama-quantize spells it
    ftype: int  # enum llama_ftype value (llama.h)
    ftype_name: str  # the enum constant's name, for messages and the llama_cpp cross-check
    main_type: str  # ggml type most 2-d weights get (key of GGML_BLOCKS)
    imatrix: Imatrix
    description: str

    @property
    def bits_per_weight(self) -> float:
        """Nominal bits per weight of the main tensor type."""
        return GGML_BLOCKS[self.main_type].bits_per_weight

    @property
    def is_float(self) -> bool:
        return self.main_type in ("F32", "F16", "BF16")

    @property
    def uses_imatrix(self) -> bool:
        return self.imatrix is not Imatrix.IGNORED


_TABLE = (
    QuantType("F32", 0, "LLAMA_FTYPE_ALL_F32", "F32", Imatrix.IGNORED,
              "32-bit float, lossless reference; 4 bytes per weight"),
    QuantType("F16", 1, "LLAMA_FTYPE_MOSTLY_F16", "F16", Imatrix.IGNORED,
              "16-bit float, practically lossless; the usual conversion source"),
    QuantType("BF16", 32, "LLAMA_FTYPE_MOSTLY_BF16", "BF16", Imatrix.IGNORED,
              "bfloat16, lossless for models trained in bf16; slow on CPUs without bf16 support"),
    QuantType("Q8_0", 7, "LLAMA_FTYPE_MOSTLY_Q8_0", "Q8_0", Imatrix.IGNORED,
              "8-bit, blocks of 32 with an f16 scale; near-lossless (the codec takes no imatrix)"),
    QuantType("Q6_K", 18, "LLAMA_FTYPE_MOSTLY_Q6_K", "Q6_K", Imatrix.USED,
              "6-bit K-quant super-blocks of 256; very close to F16"),
    QuantType("Q5_K_M", 17, "LLAMA_FTYPE_MOSTLY_Q5_K_M", "Q5_K", Imatrix.USED,
              "5-bit K-quant mix, attention V and FFN down partly Q6_K; small loss"),
    QuantType("Q5_0", 8, "LLAMA_FTYPE_MOSTLY_Q5_0", "Q5_0", Imatrix.USED,
              "5-bit, blocks of 32, scale only (legacy type)"),
    QuantType("Q4_K_M", 15, "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q4_K", Imatrix.RECOMMENDED,
              "4-bit K-quant mix, sensitive tensors Q6_K; the usual size/quality balance"),
    QuantType("Q4_1", 3, "LLAMA_FTYPE_MOSTLY_Q4_1", "Q4_1", Imatrix.USED,
              "4-bit, blocks of 32 with scale and minimum (legacy type)"),
    QuantType("Q4_0", 2, "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_0", Imatrix.RECOMMENDED,
              "4-bit, blocks of 32, scale only; fast, lower quality than Q4_K_M"),
    QuantType("IQ4_NL", 25, "LLAMA_FTYPE_MOSTLY_IQ4_NL", "IQ4_NL", Imatrix.RECOMMENDED,
              "4-bit non-linear grid, blocks of 32; better than Q4_0 at the same size"),
    QuantType("IQ4_XS", 30, "LLAMA_FTYPE_MOSTLY_IQ4_XS", "IQ4_XS", Imatrix.RECOMMENDED,
              "4.25-bit non-linear grid, super-blocks of 256; smallest 4-bit type"),
    QuantType("Q3_K_M", 12, "LLAMA_FTYPE_MOSTLY_Q3_K_M", "Q3_K", Imatrix.RECOMMENDED,
              "3-bit K-quant mix; noticeable loss, an imatrix helps a lot"),
    QuantType("Q2_K", 10, "LLAMA_FTYPE_MOSTLY_Q2_K", "Q2_K", Imatrix.RECOMMENDED,
              "2-bit K-quant mix; large loss on small models, use an imatrix"),
)

QUANT_TYPES: dict[str, QuantType] = {q.name: q for q in _TABLE}
# llama-quantize's aliases: the plain K names mean the _M mix
ALIASES: dict[str, str] = {"Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "Q3_K": "Q3_K_M"}


def names() -> list[str]:
    """Offered type names, in table order (largest to smallest)."""
    return list(QUANT_TYPES)


def get_quant_type(name: str | QuantType) -> QuantType:
    """Look a type up by name (case-insensitive, llama-quantize's aliases accepted)."""
    if isinstance(name, QuantType):
        return name
    key = str(name).strip().upper()
    key = ALIASES.get(key, key)
    if key not in QUANT_TYPES:
        raise PreflightError(
            f"gguf quantisation type must be one of {', '.join(names())}, got {name!r} "
            f"(fix: pick one of those names; aliases {', '.join(f'{a}={b}' for a, b in ALIASES.items())})")
    return QUANT_TYPES[key]
