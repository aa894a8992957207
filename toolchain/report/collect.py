"""Gather a run's artifacts into the data dict the report renders (see toolchain.report.render)."""
from __future__ import annotations

import time

from toolchain import __version__
from toolchain.pipeline.artifacts import Artifact, library_versions
from toolchain.quality.gates import bench_verdict


def collect(ctx, inputs: dict[str, Artifact]) -> dict:
    recipe = ctx.recipe
    data: dict = {"run": {
        "name": recipe.report.title or recipe.name, "recipe": str(recipe.recipe_path),
        "started": getattr(ctx, "started", None), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_s": time.perf_counter() - ctx.started_perf if getattr(ctx, "started_perf", None) else None,
        "edgesmith_version": __version__,
        "versions": library_versions(),
    }}
    if "model" in inputs:
        f = inputs["model"].figures
        data["model"] = {k: f.get(k) for k in ("source", "architecture", "model_type", "parameters", "layers",
                                               "hidden_size", "vocab_size", "chat_template")}
    if "train" in inputs:
        data["train"] = dict(inputs["train"].figures)
    if "merge" in inputs and isinstance(inputs["merge"].figures.get("qlora_merge"), dict):
        data["qlora_merge"] = dict(inputs["merge"].figures["qlora_merge"])  # both QLoRA merge candidates
    if "prune" in inputs:
        data["pruning"] = dict(inputs["prune"].figures)
        variants = _prune_variants(recipe)
        if variants:
            data["pruning"]["variants"] = variants
    if "eval" in inputs:
        data["task"] = dict(inputs["eval"].figures)
    from toolchain.report.render import exporter_sections

    hooks = dict(exporter_sections())
    targets, bench, own = [], [], {}
    for sid, art in inputs.items():
        if sid.startswith("export-"):
            f = art.figures
            size = art.size_bytes / 2**20
            targets.append({"name": f.get("target", sid[7:]), "format": f.get("format"),
                            "precision": f.get("precision"), "size_mb": size, "export_s": f.get("export_s"),
                            "imatrix": f.get("imatrix")})
            hook = hooks.get(f.get("format"))
            row = hook.collect(f) if hook else None
            if row:
                own.setdefault(f["format"], []).append(row)
        elif sid.startswith("bench-"):
            row = dict(art.figures)
            row.pop("greedy_outputs", None)
            row["gate"] = bench_verdict(row)
            bench.append(row)
    if targets:
        data["targets"] = targets
    if bench:
        data["bench"] = bench
    data.update(own)  # an exporter's own section's rows, under its name (report.json: "webllm")
    steps = getattr(ctx, "steps", None) or []
    data["stages"] = [{"stage": st.stage.id, "key": st.key, "cached": st.status == "cached", "wall_s": st.wall_s}
                      for st in steps]
    return data


def _prune_variants(recipe) -> dict | None:
    """``edgesmith prune-compare``'s figures saved in the run folder (dense and each variant, one sitting)."""
    import json

    from toolchain.report.pruning import VARIANTS_FILE

    path = recipe.run_dir() / VARIANTS_FILE
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("variants"), dict) else None
