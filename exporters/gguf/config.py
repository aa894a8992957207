"""Options of the GGUF targets (validated when the recipe is read; imports nothing heavy)."""
from __future__ import annotations

from dataclasses import dataclass

from exporters.gguf.quant_types import QUANT_TYPES

BASE_TYPES = ("F32", "F16", "BF16")


@dataclass
class GgufExportConfig:
    """`gguf` target: a merged model as one GGUF file, quantised by llama.cpp's own quantiser."""

    quant: str = "Q8_0"
    imatrix: bool = False  # importance matrix from the calibration sample (k-quants and IQ types)
    threads: int = 2

    def __post_init__(self):
        if self.quant not in QUANT_TYPES:
            raise ValueError(f"`quant` must be one of {', '.join(QUANT_TYPES)}, got {self.quant!r}")
        if self.imatrix and not QUANT_TYPES[self.quant].uses_imatrix:
            raise ValueError(f"`imatrix` has no effect on {self.quant} (llama.cpp's codec ignores it); remove it or "
                             "pick a type that uses one, e.g. Q4_K_M or IQ4_XS")
        if not isinstance(self.threads, int) or self.threads < 1:
            raise ValueError(f"`threads` must be a positive integer, got {self.threads!r}")

    @property
    def precision(self) -> str:
        return self.quant

    gate_key = precision

    @classmethod
    def gate_keys(cls) -> list[str]:
        return list(QUANT_TYPES)

    @property
    def needs_imatrix(self) -> bool:
        return self.imatrix


@dataclass
class GgufLoraConfig:
    """`gguf-lora` target: the LoRA adapter as a GGUF adapter plus the base model GGUF it applies to."""

    base_type: str = "F16"  # type of the base GGUF written beside the adapter
    adapter_type: str = "F32"  # LoRA A/B tensors: F32 or F16

    def __post_init__(self):
        if self.base_type not in BASE_TYPES:
            raise ValueError(f"`base_type` must be one of {', '.join(BASE_TYPES)}, got {self.base_type!r}")
        if self.adapter_type not in ("F32", "F16"):
            raise ValueError(f"`adapter_type` must be F32 or F16, got {self.adapter_type!r}")

    @property
    def precision(self) -> str:
        return self.base_type

    gate_key = precision

    @classmethod
    def gate_keys(cls) -> list[str]:
        return list(BASE_TYPES)

    needs_adapter = True
