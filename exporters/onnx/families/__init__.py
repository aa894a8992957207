"""Model families: architecture-specific config reading and weight-name mapping.

A family module turns a Hugging Face model directory into a format-neutral ``DecoderSpec`` and
``DecoderWeights``; the exporter writes the graph from those and never sees a tensor name.
Each family module exposes ``MODEL_TYPES``, ``read_spec(config) -> DecoderSpec`` and
``load_weights(model_dir, spec) -> DecoderWeights``.

The checkpoint reader here is shared: it lists every tensor's name and shape from the
safetensors header(s) first, so a family can check all of them before loading any.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np

from toolchain.errors import ModelSourceError, PreflightError, StageError

# model_type (config.json) -> family module under exporters.onnx.families
FAMILIES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",  # same tensor names and math; adds an optional sliding window
}


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def family_for(model_type: str | None) -> ModuleType:
    """The family module for ``model_type``, or a PreflightError saying what is supported."""
    if model_type not in FAMILIES:
        raise PreflightError(
            f"the ONNX exporter supports model_type {', '.join(map(repr, supported_model_types()))}; "
            f"this model is {model_type!r} (fix: choose another export target for this model, "
            f"or file an issue asking for {model_type!r} support in the ONNX exporter)")
    return importlib.import_module(f"{__name__}.{FAMILIES[model_type]}")


@dataclass(frozen=True)
class DecoderSpec:
    """The effective hyper-parameters of a Llama-style decoder, as the export uses them."""

    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    rms_norm_eps: float
    rope_theta: float
    rope_theta_source: str  # which config key it came from (see DESIGN.md, the rope_theta pitfall)
    tie_word_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LayerWeights:
    """One decoder layer; projection matrices in Hugging Face layout ``[out, in]``, float32."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    o: np.ndarray
    gate: np.ndarray
    up: np.ndarray
    down: np.ndarray
    input_norm: np.ndarray
    post_attention_norm: np.ndarray
    bias: dict[str, np.ndarray] = field(default_factory=dict)  # role ("q", "gate", ...) -> [out]


@dataclass
class DecoderWeights:
    embed: np.ndarray  # [vocab, hidden]
    layers: list[LayerWeights]
    norm: np.ndarray  # [hidden]
    lm_head: np.ndarray | None  # [vocab, hidden]; None when tied to ``embed``


class TensorMismatchError(StageError):
    """The checkpoint's tensors do not match what the architecture expects."""

    def __init__(self, model_dir: Path, missing: list[str], extra: list[str],
                 wrong_shape: list[tuple[str, tuple, tuple]]):
        self.missing, self.extra, self.wrong_shape = missing, extra, wrong_shape
        lines = [f"the checkpoint in {model_dir} does not match its config.json:"]
        if missing:
            lines.append(f"  missing tensors ({len(missing)}): {', '.join(missing)}")
        if extra:
            lines.append(f"  extra tensors ({len(extra)}): {', '.join(extra)}")
        for name, want, got in wrong_shape:
            lines.append(f"  wrong shape: {name} is {list(got)}, expected {list(want)}")
        lines.append("  (fix: export the merged model directory that this config.json belongs to, "
                     "or correct config.json)")
        super().__init__("\n".join(lines))


def read_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelSourceError(f"{path} not found (fix: pass a Hugging Face model directory with config.json "
                               f"and *.safetensors, e.g. the merge stage's output)")
    return json.loads(path.read_text())


class Checkpoint:
    """The tensors of a safetensors checkpoint, single file or sharded, read lazily."""

    INDEX = "model.safetensors.index.json"

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        index = self.model_dir / self.INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({self.model_dir / f for f in weight_map.values()})
        else:
            files = sorted(self.model_dir.glob("*.safetensors"))
        if not files:
            raise ModelSourceError(f"no *.safetensors files in {self.model_dir} (fix: save the model with "
                                   f"save_pretrained(..., safe_serialization=True))")
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for file in files:
            if not file.is_file():
                raise ModelSourceError(f"{file.name} is listed in {self.INDEX} but missing from {self.model_dir}")
            with _open(file) as f:
                for name in f.keys():
                    self.where[name] = file
                    self.shapes[name] = tuple(f.get_slice(name).get_shape())

    def check(self, expected: dict[str, tuple[int, ...]], ignored: set[str] = frozenset()) -> None:
        """Raise TensorMismatchError unless names and shapes match ``expected`` exactly.

        ``ignored`` names may be present or absent (e.g. a tied lm_head saved anyway).
        """
        missing = sorted(set(expected) - set(self.shapes))
        extra = sorted(set(self.shapes) - set(expected) - set(ignored))
        wrong = [(n, expected[n], self.shapes[n]) for n in sorted(set(expected) & set(self.shapes))
                 if tuple(expected[n]) != self.shapes[n]]
        if missing or extra or wrong:
            raise TensorMismatchError(self.model_dir, missing, extra, wrong)

    def load(self, name: str) -> np.ndarray:
        """One tensor as float32 numpy (bf16/fp16 are widened through torch)."""
        with _open(self.where[name]) as f:
            tensor = f.get_tensor(name)
        return tensor.float().numpy()


def _open(path: Path):
    # framework="pt": the numpy backend cannot represent bfloat16
    from safetensors import safe_open

    return safe_open(str(path), framework="pt")
