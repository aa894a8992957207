"""The `gguf-lora` target: a PEFT LoRA adapter as a llama.cpp GGUF adapter, plus the base GGUF.

llama.cpp applies such an adapter at load time over the base model (one base, many small task
adapters). For every adapted weight W (HF ``[out, in]``) the file holds ``<gguf name>.lora_a``
(A, ``[r, in]``) and ``<gguf name>.lora_b`` (B, ``[out, r]``), and llama.cpp adds
``scale * alpha / r * B @ A`` to W. The base weight's layout transform (e.g. the q/k row
permutation for llama.cpp's rope) is applied to B, since it only reorders output rows; this is
checked numerically for every adapted tensor, so a transform that is not a row operation is
refused instead of silently producing a wrong adapter.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np

from exporters.gguf.config import GgufLoraConfig
from toolchain.core.errors import PreflightError
from toolchain.core.files import atomic_path

PEFT_PREFIX = "base_model.model."
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"
TRANSFORM_CHECK_RTOL = 1e-5  # transform(B @ A) vs transform(B) @ A: fp32 rounding only


def read_adapter(adapter_dir: Path) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(adapter_config, {hf weight name: (A, B)}) from a PEFT adapter directory."""
    from safetensors.numpy import load_file

    cfg = read_adapter_config(adapter_dir)
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for name, t in tensors.items():
        for suffix, key in ((A_SUFFIX, "A"), (B_SUFFIX, "B")):
            if name.endswith(suffix):
                base = name[: -len(suffix)]
                base = base[len(PEFT_PREFIX):] if base.startswith(PEFT_PREFIX) else base
                pairs.setdefault(base + ".weight", {})[key] = t.astype(np.float32)
                break
        else:
            raise PreflightError(f"adapter tensor {name!r} is not a LoRA A/B matrix (embedding or norm updates "
                                 "cannot be exported as a llama.cpp adapter)")
    broken = [n for n, p in pairs.items() if set(p) != {"A", "B"}]
    if broken:
        raise PreflightError(f"adapter lacks the A or B half of {broken[:3]}")
    return cfg, {n: (p["A"], p["B"]) for n, p in pairs.items()}


def read_adapter_config(adapter_dir: Path) -> dict:
    """adapter_config.json, refused unless llama.cpp can apply the adapter as it is (plain LoRA A/B pairs)."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise PreflightError(f"gguf-lora: {path} is missing; the adapter folder must be a PEFT LoRA adapter")
    cfg = json.loads(path.read_text())
    if cfg.get("peft_type") != "LORA":
        raise PreflightError(f"{path}: peft_type must be LORA, got {cfg.get('peft_type')!r}")
    if cfg.get("use_dora"):
        raise PreflightError(f"{path}: use_dora is true, and llama.cpp applies only a LoRA's A and B at load time, "
                             "not DoRA's per-row magnitudes, so the gguf-lora target cannot carry this adapter "
                             "(fix: export the merged model with format gguf, or train with train.lora.dora: false)")
    return cfg


def effective_alpha(cfg: dict, rank: int) -> float:
    """The alpha llama.cpp needs so that its alpha / r equals PEFT's scale."""
    alpha = float(cfg.get("lora_alpha", rank))
    return alpha * math.sqrt(rank) if cfg.get("use_rslora") else alpha


def write_adapter(base_dir: Path, adapter_dir: Path, out_path: Path, adapter_type: str = "F32") -> dict:
    from exporters.gguf.families import Checkpoint, plan_tensors
    from exporters.gguf.writer import run_preflight

    pre = run_preflight(base_dir, {"out_type": "F32"})
    cfg, pairs = read_adapter(adapter_dir)
    entries, _ = plan_tensors(pre.family, pre.hparams, Checkpoint(base_dir))
    by_hf = {e.hf_name: e for e in entries}
    unknown = sorted(set(pairs) - set(by_hf))
    if unknown:
        raise PreflightError(f"adapter targets weights the GGUF base does not have: {unknown[:5]} "
                             "(e.g. a tied lm_head; fix: train without adapting it)")
    ranks = {a.shape[0] for a, _ in pairs.values()}
    if len(ranks) != 1:
        raise PreflightError(f"adapter uses several ranks {sorted(ranks)}; llama.cpp needs one alpha/rank per file")
    rank = ranks.pop()
    dtype = np.float16 if adapter_type == "F16" else np.float32

    writer = gguf.GGUFWriter(path=None, arch=pre.hparams.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, effective_alpha(cfg, rank))
    writer.add_name(f"{Path(adapter_dir).name} (LoRA r={rank})")
    for hf_name in sorted(pairs, key=lambda n: by_hf[n].gguf_name):
        a, b = pairs[hf_name]
        entry = by_hf[hf_name]
        if entry.transform is not None:
            tb = entry.transform(b)
            full = entry.transform(b @ a)
            if tb.shape != b.shape or not np.allclose(tb @ a, full, rtol=TRANSFORM_CHECK_RTOL, atol=1e-6):
                raise PreflightError(f"{hf_name}: the base tensor's GGUF layout transform is not a row reordering, "
                                     "so the adapter cannot be expressed over the base GGUF")
            b = tb
        writer.add_tensor(entry.gguf_name + ".lora_a", np.ascontiguousarray(a.astype(dtype)))
        writer.add_tensor(entry.gguf_name + ".lora_b", np.ascontiguousarray(b.astype(dtype)))
    with atomic_path(out_path) as tmp:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {"tensors": 2 * len(pairs), "adapted_weights": len(pairs), "rank": rank,
            "alpha": effective_alpha(cfg, rank), "arch": pre.hparams.arch, "size": out_path.stat().st_size}


def preflight(model_dir, options: dict | None = None) -> None:
    try:
        GgufLoraConfig(**(options or {}))
    except (TypeError, ValueError) as exc:
        raise PreflightError(f"gguf-lora target: {exc}") from None


def export(model_dir, out_dir, options: dict | None = None, adapter_dir: Path | None = None,
           base_dir: Path | None = None) -> dict:
    """Write ``base-<type>.gguf`` (the unmerged base model) and ``adapter.gguf`` into ``out_dir``."""
    from exporters.gguf import write_gguf

    cfg = GgufLoraConfig(**(options or {}))
    if adapter_dir is None or base_dir is None:
        raise PreflightError("gguf-lora needs the trained adapter and the base model (a recipe with `data`)")
    read_adapter_config(Path(adapter_dir))  # refuse a DoRA adapter before the base GGUF is written
    out_dir = Path(out_dir)
    base_name = f"base-{cfg.base_type}.gguf"
    base = write_gguf(Path(base_dir), out_dir / base_name, out_type=cfg.base_type)
    adapter = write_adapter(Path(base_dir), Path(adapter_dir), out_dir / "adapter.gguf", cfg.adapter_type)
    return {"format": "gguf-lora", "precision": cfg.base_type, "base": base, "adapter": adapter,
            "runtime_options": {"model_file": base_name, "lora_path": "adapter.gguf"}}
