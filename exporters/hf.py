"""Reading a merged Hugging Face checkpoint, shared by every exporter.

- ``read_config`` and ``Checkpoint``: config.json and the safetensors tensors (single file or
  sharded, bf16/fp16 widened), with every name and shape checked against what an architecture
  expects (``TensorMismatchError`` lists missing, extra and wrongly shaped tensors separately);
- ``read_rope``: the rotary embedding from either config layout. transformers 5 keeps
  ``rope_theta`` under ``rope_parameters`` and 4.57 reads only the top-level key, silently falling
  back to 10000 (the drift docs/architecture.md records (facts)), so every exporter reads it here, one way;
- ``positive_int`` and ``refuse``: config values checked with errors that name key, value and fix.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from toolchain.core.errors import ModelSourceError, PreflightError, StageError

ROPE_DEFAULT = "default"  # the plain rotary embedding's rope_type
DEFAULT_ROPE_THETA = 10000.0  # transformers' default when a config names none
# buffers older checkpoints saved; transformers ignores them on load, and so do we
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def refuse(what: str, value, fix: str) -> PreflightError:
    return PreflightError(f"config.json: {what}, got {value!r} (fix: {fix})")


@dataclass(frozen=True)
class Rope:
    """One rotary embedding as config.json describes it (transformers 4 or 5 layout)."""

    theta: float
    source: str  # which config key theta came from (see docs/architecture.md, facts: the rope_theta pitfall)
    rope_type: str = ROPE_DEFAULT
    params: dict = field(default_factory=dict)  # the rest: factor, long_factor, ...


def read_rope(config: dict, section: str | None = None, default_theta: float = DEFAULT_ROPE_THETA) -> Rope:
    """The rotary embedding of ``config`` (of one attention kind, ``section``, for Gemma3).

    transformers 5 writes ``rope_parameters: {rope_theta, rope_type, ...}``, per attention kind
    for some models (``{"full_attention": {...}, "sliding_attention": {...}}``); older versions
    wrote top-level ``rope_theta`` and an optional ``rope_scaling``. Reading only one of them
    silently falls back to 10000 on the other kind of file, which is the drift docs/architecture.md records (facts).
    """
    block = config.get("rope_parameters")
    where = "rope_parameters"
    if block is None:
        block, where = config.get("rope_scaling"), "rope_scaling"
    if block is not None and not isinstance(block, dict):
        raise refuse(f"`{where}` must be a mapping", block, "fix config.json")
    block = dict(block or {})
    if section is not None and isinstance(block.get(section), dict):
        block, where = dict(block[section]), f"{where}.{section}"
    rope_type = block.pop("rope_type", block.pop("type", ROPE_DEFAULT)) or ROPE_DEFAULT
    if "rope_theta" in block:
        theta, source = block.pop("rope_theta"), f"{where}.rope_theta"
    elif "rope_theta" in config:
        theta, source = config["rope_theta"], "rope_theta"
    else:
        theta, source = default_theta, "default"
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise refuse("`rope_theta` must be a positive number", theta, "fix config.json")
    return Rope(float(theta), source, str(rope_type), block)


def positive_int(config: dict, key: str, default=None) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise refuse(f"`{key}` must be a positive integer", value, "fix config.json")
    return value


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
