"""The report's pruning section: the prune stage's figures (toolchain/stages/prune.py) as a table of
the dense, pruned and healed models, the cuts, and the per-layer importance plot."""
from __future__ import annotations

from toolchain.report.format import DASH, fmt, fmt_pct

NOTE_SPARSE = ("Sparse masks are a quality experiment: onnxruntime, llama.cpp, MLC and XNNPACK store and run the "
               "zeros densely, so a masked model is neither smaller nor faster on any target edgesmith ships.")


def _signed_pct(x) -> str:
    return f"{100 * x:+.1f}%" if isinstance(x, (int, float)) else DASH


def _mb(n) -> str:
    return fmt(n / 2**20, ".1f") + " MB" if isinstance(n, (int, float)) else DASH


def section(p: dict, have_plot: bool) -> tuple:
    models = p.get("models") if isinstance(p.get("models"), dict) else {}
    sizes = p.get("size_bytes") if isinstance(p.get("size_bytes"), dict) else {}
    structured = p.get("structured") if isinstance(p.get("structured"), dict) else {}
    params = structured.get("parameters") if isinstance(structured.get("parameters"), dict) else {}
    rows = []
    for name in ("dense", "pruned", "healed"):
        m = models.get(name)
        if not isinstance(m, dict):
            continue
        size = sizes.get("dense") if name == "dense" else sizes.get("pruned")
        count = params.get("before") if name == "dense" else params.get("after")
        rows.append([name + (" (written)" if name == ("healed" if "healed" in models else "pruned") else ""),
                     _mb(size), fmt(count / 1e6, ".1f") + " M" if isinstance(count, (int, float)) else DASH,
                     fmt(m.get("ppl"), ".4g"), _signed_pct(m.get("delta_ppl")) if name != "dense" else DASH,
                     fmt(m.get("kl_mean"), ".3g") if name != "dense" else DASH,
                     fmt_pct(m.get("top1")) if name != "dense" else DASH, fmt(m.get("task_metric"), ".3g")])
    blocks: list = []
    before, after = structured.get("before") or {}, structured.get("after") or {}
    cuts = []
    for key, label in (("layers", "layers"), ("intermediate", "MLP channels"), ("heads", "query heads"),
                       ("kv_heads", "KV heads")):
        if key in before and key in after and before[key] != after[key]:
            cuts.append(f"{label} {before[key]} → {after[key]}")
    dropped = structured.get("dropped_layers")
    text = f"Scores: {p.get('score')}; " + ("; ".join(cuts) if cuts else "no structured cut")
    if dropped:
        text += f" (dropped layers {', '.join(str(i) for i in dropped)})"
    sparsity = p.get("sparsity") if isinstance(p.get("sparsity"), dict) else None
    if sparsity:
        text += f"; sparsity of the decoder linears {fmt_pct(sparsity.get('overall'))}, re-applied after healing"
    blocks.append(("p", text + "."))
    if rows:
        blocks.append(("table", ["Model", "Size on disk", "Parameters", "PPL (eval answers)", "ΔPPL vs dense",
                                 "KL vs dense", "Top-1 vs dense", "Task metric"], rows, "lrrrrrrr"))
        blocks.append(("p", "Perplexity, KL and top-1 over the eval split's answer tokens, against the dense "
                            "fine-tuned model; the speed of the written model per target is in the benchmark table."))
    if sparsity:
        blocks.append(("p", NOTE_SPARSE))
    if have_plot:
        blocks.append(("img", "importance", "Per-layer importance (angular distance) on the calibration sample"))
    return ("Pruning", blocks)
