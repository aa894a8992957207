"""``train.method: qlora``: LoRA adapters trained on a frozen 4-bit (NF4/FP4) base (peft + bitsandbytes).

Everything LoRA offers (rank, targets, DoRA, rsLoRA, the tied-target refusal) carries over: this is
LoRA's method with another base and another merge. The base is loaded 4-bit by transformers'
``BitsAndBytesConfig`` from ``train.qlora`` (defaults when omitted: nf4, double quantisation, compute
dtype float32 on the CPU and bfloat16 on CUDA). Only the linear layers are quantised: the embedding,
the LM head (tied to it in SmolLM2: they stay one tensor) and the norms stay full precision.

peft's ``prepare_model_for_kbit_training`` is used for what it does cheaply (freeze the base, lift
half-precision leftovers to float32); its gradient checkpointing only on CUDA, where memory is what
QLoRA is for: on the CPU bitsandbytes already dequantises every weight on each forward and backward
(docs/architecture.md, facts), and recomputing activations would add another forward per step.

The adapter was trained against dequant(quant(W)), not W, so it is never merged into the 4-bit base
(peft would re-quantise the sum) and the merge is measured both ways: ``toolchain.training.qlora_merge``.
The quantisation settings the adapter was trained against are saved beside it (``qlora.json``).
"""
from __future__ import annotations

import json
from pathlib import Path

from toolchain.core.errors import StageError
from toolchain.training.lora import Lora

SETTINGS_FILE = "qlora.json"  # beside the adapter: the 4-bit settings it was trained against


def settings(qcfg, cuda: bool | None = None) -> dict:
    """The 4-bit settings of ``train.qlora`` (a QloraSection, or None for the defaults), compute dtype resolved."""
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    quant_type = getattr(qcfg, "quant_type", "nf4")
    double_quant = bool(getattr(qcfg, "double_quant", True))
    compute = getattr(qcfg, "compute_dtype", "auto")
    if compute == "auto":
        compute = "bfloat16" if cuda else "float32"
    return {"quant_type": quant_type, "double_quant": double_quant, "compute_dtype": compute}


def device_map() -> dict:
    """Where the 4-bit base lives: the GPU when there is one (the Trainer trains there), else the CPU."""
    import torch

    return {"": 0} if torch.cuda.is_available() else {"": "cpu"}


def load_4bit(base_dir: Path, quant: dict, compute_dtype: str | None = None):
    """The base with its linear layers in 4-bit (``quant`` as :func:`settings` gives it); the embedding, the
    LM head and the norms stay float32. ``compute_dtype`` overrides the matmul dtype (the merge measures in float32)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant["quant_type"],
                             bnb_4bit_use_double_quant=quant["double_quant"],
                             bnb_4bit_compute_dtype=getattr(torch, compute_dtype or quant["compute_dtype"]))
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, quantization_config=cfg,
                                                 device_map=device_map())
    from toolchain.training.qlora_merge import exact_cpu_path

    exact_cpu_path(model)  # eval (no grad) computes as training does, not through the bfloat16 fused kernel
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and type(head).__name__ == "Linear4bit":
        raise StageError(f"{base_dir}: the 4-bit load quantised the LM head; it must stay full precision "
                         "(fix: report it, with the model's config.json)")
    if getattr(model.config, "tie_word_embeddings", False) and head is not None and \
            head.weight.data_ptr() != emb.weight.data_ptr():
        raise StageError(f"{base_dir}: the 4-bit load untied the LM head from the input embedding "
                         "(config tie_word_embeddings: true) (fix: report it)")
    return model


def quantized_modules(model) -> list[str]:
    """Names of the modules holding 4-bit weights (bitsandbytes Linear4bit)."""
    return [name for name, m in model.named_modules() if type(m).__name__ == "Linear4bit"]


def footprint(model) -> dict:
    """The 4-bit model's memory footprint and the same model's in float32, in bytes."""
    fp32 = 0
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        n = qs.shape.numel() if qs is not None else p.numel()
        fp32 += 4 * n
    fp32 += sum(b.numel() * b.element_size() for b in model.buffers())
    q = int(model.get_memory_footprint())
    return {"base_memory_bytes": q, "base_memory_fp32_bytes": int(fp32), "base_memory_ratio": q / fp32 if fp32 else None}


class Qlora(Lora):
    name = "qlora"
    summary = "LoRA adapters on a 4-bit (NF4/FP4) base (peft + bitsandbytes), merged in float32 and measured"

    def __init__(self):
        self._trained: dict = {}  # what load_base saw (settings, footprint), for figures() and save()

    def load_base(self, base_dir: Path, tcfg):
        quant = settings(tcfg.qlora)
        model = load_4bit(base_dir, quant)
        self._trained = {**quant, **footprint(model), "quantized_modules": quantized_modules(model)}
        return model

    def wrap(self, model, tcfg):
        import torch
        from peft import prepare_model_for_kbit_training

        cuda = torch.cuda.is_available()
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cuda)
        self._trained["gradient_checkpointing"] = cuda
        return super().wrap(model, tcfg)

    def save(self, model, out_dir: Path) -> None:
        from toolchain.core.files import write_json_atomic

        super().save(model, out_dir)
        keep = ("quant_type", "double_quant", "compute_dtype", "quantized_modules")
        write_json_atomic(Path(out_dir) / SETTINGS_FILE, {k: self._trained[k] for k in keep if k in self._trained})

    def figures(self, tcfg) -> dict:
        quant = settings(tcfg.qlora)
        t = self._trained
        return {**super().figures(tcfg), "quant_type": quant["quant_type"], "double_quant": quant["double_quant"],
                "compute_dtype": quant["compute_dtype"],
                "gradient_checkpointing": t.get("gradient_checkpointing"),
                "base_memory_bytes": t.get("base_memory_bytes"),
                "base_memory_fp32_bytes": t.get("base_memory_fp32_bytes"),
                "base_memory_ratio": t.get("base_memory_ratio"),
                "quantized_modules": len(t.get("quantized_modules") or [])}

    def merge(self, base_dir: Path, adapter_dir: Path, out_dir: Path, recipe, data_dir: Path | None = None) -> dict:
        from toolchain.training.qlora_merge import merge_qlora

        return merge_qlora(base_dir, adapter_dir, out_dir, recipe, data_dir, trained_settings(adapter_dir, recipe), load_4bit)


def trained_settings(adapter_dir: Path, recipe) -> dict:
    """The 4-bit settings the adapter was trained against: its ``qlora.json``, else the recipe's."""
    path = Path(adapter_dir) / SETTINGS_FILE
    if path.exists():
        return json.loads(path.read_text())
    return settings(recipe.train.qlora)


METHOD = Qlora()
