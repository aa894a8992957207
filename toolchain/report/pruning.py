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


def section(p: dict, have_plot: bool, have_variants_plot: bool = False) -> tuple:
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
    if isinstance(p.get("variants"), dict):
        blocks += variants_blocks(p["variants"], have_variants_plot)
    return ("Pruning", blocks)


# --- `edgesmith prune-compare`: dense and each variant, measured in one sitting ---------------------------
VARIANTS_FILE = "prune-variants.json"  # in the run folder, next to report.html
NOTE_VARIANTS = ("No target edgesmith ships runs unstructured or N:M sparsity faster or smaller: onnxruntime, "
                 "llama.cpp and MLC store and multiply the zeros densely, so those rows are dense's size and speed. "
                 "Only the structured cut (fewer layers, narrower MLPs, fewer heads) pays on the edge.")


# the region the variants plot shades: at least 20% smaller and 1.2x dense decode at the same quantisation
PAYS = (0.80, 1.20)


def variant_points(doc: dict) -> list[dict]:
    """Per variant, target and runtime: size and decode speed as ratios to dense in the same sitting."""
    variants = doc.get("variants") if isinstance(doc, dict) and isinstance(doc.get("variants"), dict) else {}
    dense = (variants.get("dense") or {}).get("targets") or {}
    out = []
    for name, v in variants.items():
        for target, t in ((v.get("targets") or {}) if isinstance(v, dict) else {}).items():
            d = dense.get(target) or {}
            d_runs = {r.get("runtime"): r for r in d.get("runs", [])}
            for r in t.get("runs", []):
                dr = d_runs.get(r.get("runtime")) or {}
                size, dsize, dec, ddec = t.get("size_bytes"), d.get("size_bytes"), r.get("decode_tps"), dr.get("decode_tps")
                out.append({"variant": name, "target": target, "runtime": r.get("runtime"),
                            "size_ratio": size / dsize if _num(size) and _num(dsize) else None,
                            "decode_ratio": dec / ddec if _num(dec) and _num(ddec) else None})
    return out


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


def _x(ratio) -> str:
    return f"{ratio:.2f}x" if isinstance(ratio, (int, float)) else DASH


def variants_tables(doc: dict) -> list[tuple[list[str], list[list[str]], str]]:
    """Two tables: per variant and target, size and speed against dense; per variant, quality against dense."""
    variants = doc.get("variants") if isinstance(doc.get("variants"), dict) else {}
    targets = (doc.get("meta") or {}).get("targets") or sorted({t for v in variants.values() for t in v.get("targets", {})})
    ratios = {(q["variant"], q["target"], q["runtime"]): q for q in variant_points(doc)}
    speed = []
    for name, v in variants.items():
        for target in targets:
            t = (v.get("targets") or {}).get(target)
            if not t:
                continue
            for r in t.get("runs", []) or [{}]:
                q = ratios.get((name, target, r.get("runtime")), {})
                gate = DASH if r.get("gate_passed") is None else "pass" if r["gate_passed"] else \
                    "FAIL (" + "; ".join(r.get("gate_failures") or []) + ")"
                speed.append([name, target, r.get("runtime") or DASH, _mb(t.get("size_bytes")),
                              _x(q.get("size_ratio")), fmt(r.get("prefill_tps"), ".1f"), fmt(r.get("decode_tps"), ".1f"),
                              _x(q.get("decode_ratio")), fmt(r.get("kl_mean"), ".3g"), gate])
    quality = []
    dense_metric = next((m.get("task_metric") for x in variants.values()
                         for k, m in ((x.get("pruning") or {}).get("models") or {}).items() if k == "dense"), None)
    for name, v in variants.items():
        models = (v.get("pruning") or {}).get("models") or {}
        if name == "dense" or not models:
            quality.append([name, DASH, DASH, DASH, DASH, fmt(dense_metric, ".3f"), DASH, DASH])
            continue
        before, healed = models.get("pruned") or {}, models.get("healed") or {}
        after = healed or before
        quality.append([name, _signed_pct(before.get("delta_ppl")), _signed_pct(healed.get("delta_ppl")),
                        fmt(after.get("kl_mean"), ".3g"), fmt_pct(after.get("top1")),
                        fmt((models.get("dense") or {}).get("task_metric"), ".3f"), fmt(before.get("task_metric"), ".3f"),
                        fmt(healed.get("task_metric"), ".3f")])
    return [(["Variant", "Target", "Runtime", "Size on disk", "vs dense", "Prefill tok/s", "Decode tok/s",
              "Decode vs dense", "KL vs own reference", "Gate"], speed, "lllrrrrrrl"),
            (["Variant", "ΔPPL vs dense, cut", "ΔPPL vs dense, healed", "KL vs dense", "Top-1 vs dense",
              "Task metric, dense", "Task metric, cut", "Task metric, healed"], quality, "lrrrrrrr")]


def variants_intro(doc: dict) -> str:
    meta = doc.get("meta") or {}
    bench = meta.get("bench") or {}
    rounds = meta.get("rounds", 1)
    then = f", then the median of {rounds} rounds taken in turn" if isinstance(rounds, int) and rounds > 1 else ""
    return (f"Dense and each pruning variant measured in one sitting by `edgesmith prune-compare` "
            f"({meta.get('finished', DASH)}, {meta.get('cpus', DASH)} CPUs, {bench.get('threads', DASH)} threads, "
            f"{bench.get('prompt_tokens', DASH)}-token prompt, {bench.get('gen_tokens', DASH)} generated tokens, "
            f"medians of {bench.get('repetitions', DASH)} repetitions{then}). Ratios are to dense in this sitting; "
            "each gate compares the target with its own variant's torch reference; quality is the prune stage's, "
            "on the eval split's answers.")


def variants_blocks(doc: dict, have_plot: bool = False) -> list:
    blocks: list = [("p", variants_intro(doc))]
    if have_plot:
        blocks.append(("img", "variants", "Size and decode speed of each variant against dense; shaded: at least "
                                          f"{100 * (1 - PAYS[0]):.0f}% smaller and {PAYS[1]}x faster"))
    for headers, rows, align in variants_tables(doc):
        if rows:
            blocks.append(("table", headers, rows, align))
    blocks.append(("p", NOTE_VARIANTS))
    return blocks


def variants_markdown(doc: dict) -> str:
    lines = [variants_intro(doc), ""]
    for headers, rows, _ in variants_tables(doc):
        lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows] + [""]
    return "\n".join(lines + [NOTE_VARIANTS, ""])
