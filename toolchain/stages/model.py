"""Stage ``model``: the base model as a safetensors Hugging Face directory (a GGUF source dequantised).

Right after it exists (made or cached), every target's preflight runs on it, so an architecture or
setting an exporter cannot take is reported in seconds, not after the fine-tune.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from toolchain.core.errors import EdgesmithError, PreflightError
from toolchain.pipeline.artifacts import Artifact, fingerprint_path
from toolchain.pipeline.plan import BASE, Context, PlanState, Stage
from toolchain.pipeline.recipe import Recipe


def plan(recipe: Recipe, state: PlanState) -> list[Stage]:
    from toolchain.core.models import resolve_source

    m = recipe.model
    source_fp = m.source
    try:
        src = resolve_source(m.source, recipe.base_dir, m.gguf_file)
        source_fp = {"kind": src.kind, "id": src.hub_id, "revision": m.revision,
                     "fingerprint": fingerprint_path(src.path) if src.path else None}
    except EdgesmithError:
        pass  # reported when the model stage runs
    return [Stage(BASE, "model", [], {"model": asdict(m), "source": source_fp}, run,
                  f"load {m.source} and save it as a safetensors checkpoint", ready=preflight_targets)]


def run(ctx: Context, inputs: dict[str, Artifact], out: Path) -> dict:
    from toolchain.core.models import (
        load_model_and_tokenizer,
        resolve_source,
        save_hf_dir,
    )

    m = ctx.recipe.model
    src = resolve_source(m.source, ctx.recipe.base_dir, m.gguf_file)
    ctx.log(f"  loading {src.description}")
    model, tok = load_model_and_tokenizer(src, m.dtype, m.trust_remote_code, m.revision)
    save_hf_dir(model, tok, out)
    return {"source": src.description, "kind": src.kind, "architecture": type(model).__name__,
            "model_type": model.config.model_type, "parameters": int(sum(p.numel() for p in model.parameters())),
            "layers": model.config.num_hidden_layers, "hidden_size": model.config.hidden_size,
            "vocab_size": model.config.vocab_size, "chat_template": bool(getattr(tok, "chat_template", None))}


def preflight_targets(ctx: Context, model: Artifact) -> None:
    """Every target's preflight on the base model, and every benchmark runtime's tools (node, chromium, ...),
    before training."""
    from toolchain.pipeline.registry import EXPORTERS, RUNTIMES
    from toolchain.stages import prune

    prune.preflight(ctx, model.path)  # the recipe's cuts against this model's shapes
    for t in ctx.recipe.targets:
        check = EXPORTERS.get(t.format).preflight()
        if check is not None:
            check(model.path, t.options)
        for rt in t.bench_runtimes:
            missing = RUNTIMES.get(rt).missing()
            if missing:
                raise PreflightError(f"target {t.name!r} is benchmarked on {rt!r}, which needs "
                                     f"{', '.join(missing)} (fix: {RUNTIMES.get(rt).install_hint()}, or drop {rt} "
                                     f"from the target's runtimes)")
