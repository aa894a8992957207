"""Model families for the MLC (WebLLM) weights: mlc-llm's model config and parameter names.

A family knows one architecture as mlc-llm models it, and nothing about the file format:

- ``model_config(hf_config, **overrides) -> dict``: the ``model_config`` block mlc-llm writes into
  mlc-chat-config.json (its config dataclass's fields, in its order, with its defaulting rules),
  PreflightError for a config mlc-llm's graph cannot express;
- ``params(model_config) -> list[Param]``: every MLC parameter before quantisation, in the order
  of mlc-llm's ``nn.Module`` (the order a compiled library's ``_metadata`` lists them), each with
  its shape, role and the Hugging Face tensors it is made of (fused projections concatenate
  rows: ``qkv_proj = [q; k; v]``, ``gate_up_proj = [gate; up]``);
- ``skipped(model_config, hf_names) -> dict``: checkpoint tensors deliberately not used.

``plan(family, model_config, shapes)`` checks every source tensor's name and shape against the
checkpoint, missing, extra and wrongly shaped names reported separately.
"""
from __future__ import annotations

from toolchain.core.errors import PreflightError

from .common import (
    QUANTISABLE,
    ROPE_DEFAULT,
    Family,
    Param,
    apply_overrides,
    check_heads,
    context_window,
    decoder_params,
    effective_rope_theta,
    plan,
    source_shapes,
)

__all__ = ["FAMILIES", "Family", "Param", "QUANTISABLE", "ROPE_DEFAULT", "apply_overrides", "check_heads",
           "context_window", "decoder_params", "effective_rope_theta", "family_for", "plan", "source_shapes"]


# --- the registry ------------------------------------------------------------------------------

def _families() -> dict[str, Family]:
    from . import llama, qwen2  # each imports .common, never this package

    return {f.name: f for f in (llama.FAMILY, qwen2.FAMILY)}


FAMILIES: dict[str, Family] = _families()


def family_for(hf_config: dict) -> Family:
    """The family for a HF config.json (by ``architectures``, else ``model_type``).

    PreflightError naming the supported architectures when none fits.
    """
    archs = hf_config.get("architectures") or []
    for fam in FAMILIES.values():
        if any(a in fam.architectures for a in archs):
            return fam
    if not archs:
        for fam in FAMILIES.values():
            if hf_config.get("model_type") in fam.hf_model_types:
                return fam
    supported = ", ".join(a for fam in FAMILIES.values() for a in fam.architectures)
    got = archs or hf_config.get("model_type")
    raise PreflightError(
        f"config.json: the WebLLM exporter supports the architectures {supported}; this model is {got!r} "
        f"(fix: choose another export target for this model, or file an issue asking for it in the WebLLM exporter)")
