"""The run report: report.json, report.md, report.html and PNG plots in one directory.

`write_report(data, out_dir)` renders whatever parts of a run are present (only "run" is
expected; a user who ran only `bench` gets a report of the benchmark alone). The content is
built once as a list of sections of neutral blocks (key/value lists, tables, bullet lists,
images) and rendered twice, so the Markdown and the HTML say the same thing. The HTML is one
self-contained file: inline CSS, plots embedded as base64 data URIs, nothing fetched.
Every file is written under a temporary name and renamed into place when whole.
"""
from __future__ import annotations

import base64
import contextlib
import html
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from toolchain.core.files import write_bytes_atomic
from toolchain.report import plots
from toolchain.report.format import (
    DASH,
    _clip,
    _num,
    fmt,
    fmt_count,
    fmt_duration,
    fmt_pct,
    fmt_pm,
    fmt_value,
    jsonable,
)

SAMPLES_SHOWN = 5  # task samples in the report (the rest stay in report.json)
KEY_CHARS = 12  # stage cache keys are shown shortened, like git commit ids
FILE_MODE = 0o644
PLOTS = {"latency": "latency.png", "loss": "loss.png", "task": "task_metric.png", "importance": "importance.png",
         "variants": "prune_variants.png"}


# ---------------------------------------------------------------- content

# A block is one of: ("kv", [(label, text)]), ("table", headers, rows, align),
# ("list", [text]), ("p", text), ("img", plot key, alt). align has one letter per column,
# "l" or "r". A section is (title, [blocks]).

_TRAIN_KEYS = [  # (key, label, formatter) shown first, in this order
    ("method", "Method", str), ("rank", "Rank", fmt_value), ("alpha", "Alpha", fmt_value),
    ("epochs", "Epochs", fmt_value), ("steps", "Steps", fmt_value),
    ("train_tokens", "Train tokens", fmt_value),
    ("tokens_per_s", "Throughput", lambda v: f"{fmt(v)} tokens/s"),
    ("wall_s", "Wall time", fmt_duration), ("final_loss", "Final loss", lambda v: fmt(v, ".4f")),
]


def _label(key: str) -> str:
    return key.replace("_", " ").capitalize()


def _kv_generic(d: dict, skip: set[str]) -> list[tuple[str, str]]:
    return [(_label(k), fmt_value(v)) for k, v in d.items()
            if k not in skip and not isinstance(v, dict) and not
            (isinstance(v, list) and any(isinstance(e, (dict, list)) for e in v))]


def _run_section(run: dict) -> tuple:
    versions = run.get("versions") or {}
    kv = [("Name", fmt_value(run.get("name"))), ("Recipe", fmt_value(run.get("recipe"))),
          ("Started", fmt_value(run.get("started"))), ("Finished", fmt_value(run.get("finished"))),
          ("Wall time", fmt_duration(run.get("wall_s"))),
          ("edgesmith", fmt_value(run.get("edgesmith_version")))]
    if versions:
        kv.append(("Libraries", ", ".join(f"{k} {v}" for k, v in versions.items())))
    known = {"name", "recipe", "started", "finished", "wall_s", "edgesmith_version", "versions"}
    return ("Run", [("kv", kv + _kv_generic(run, known))])


def _model_section(model: dict) -> tuple:
    kv = [("Source", fmt_value(model.get("source"))),
          ("Architecture", fmt_value(model.get("architecture"))),
          ("Parameters", fmt_count(model.get("parameters")))]
    return ("Model", [("kv", kv + _kv_generic(model, {"source", "architecture", "parameters"}))])


def _train_section(train: dict, have_plot: bool) -> tuple:
    kv = [(label, f(train[key])) for key, label, f in _TRAIN_KEYS if key in train]
    kv += _kv_generic(train, {k for k, _, _ in _TRAIN_KEYS} | {"log_history"})
    blocks: list = [("kv", kv)]
    if have_plot:
        blocks.append(("img", "loss", "Training and eval loss against step"))
    return ("Training", blocks)


def _qlora_merge_section(q: dict) -> tuple:
    """Both QLoRA merge candidates against the model as trained (toolchain.training.qlora_merge)."""
    cands = q.get("candidates") if isinstance(q.get("candidates"), dict) else {}
    rows = []
    for name, c in cands.items():
        c = c if isinstance(c, dict) else {}
        rows.append([name + (" (written)" if name == q.get("chosen") else ""), fmt(c.get("kl_mean"), ".3g"),
                     fmt_pct(c.get("top1_agreement")), fmt(c.get("eval_loss"), ".4f"), _gate_cell(c)])
    rows.append(["as trained (4-bit base + adapter)", DASH, DASH, fmt(q.get("trained_eval_loss"), ".4f"), DASH])
    return ("QLoRA merge", [("table", ["Candidate", "KL vs as trained", "Top-1", "Eval loss", "Gate"], rows, "lrrrl"),
                            ("p", f"{fmt_value(q.get('reason'))}; {fmt_value(q.get('rows'))} eval rows. "
                                  f"{fmt_value(q.get('other_differs_because'))}")])


def _task_section(task: dict, have_plot: bool) -> tuple:
    metric = str(task.get("metric") or "metric")
    before, after = _num(task.get("before")), _num(task.get("after"))
    delta = f" ({after - before:+.4g})" if before is not None and after is not None else ""
    line = f"{metric}: {fmt(before, '.4g')} → {fmt(after, '.4g')}{delta}"
    if task.get("examples"):
        line += f" on {fmt_value(task['examples'])} examples"
    blocks: list = [("p", line)]
    if have_plot:
        blocks.append(("img", "task", f"Task {metric} before and after fine-tuning"))
    samples = [s for s in task.get("samples") or [] if isinstance(s, dict)][:SAMPLES_SHOWN]
    if samples:
        rows = [[_clip(s.get(k)) for k in ("prompt", "reference", "before", "after")]
                for s in samples]
        blocks.append(("table", ["Prompt", "Reference", "Before", "After"], rows, "llll"))
    return ("Task", blocks)


def _targets_section(targets: list[dict]) -> tuple:
    rows = [[fmt_value(t.get("name")), fmt_value(t.get("format")), fmt_value(t.get("precision")),
             fmt(t.get("size_mb")), fmt(t.get("export_s"))] for t in targets]
    return ("Targets", [("table", ["Target", "Format", "Precision", "Size MB", "Export s"],
                         rows, "lllrr")])


_BENCH_HEADERS = ["Target", "Runtime", "Size MB", "Load s", "TTFT ms", "Prefill tok/s",
                  "Decode tok/s", "Peak RSS MB", "KL mean", "Top-1", "PPL", "ΔPPL",
                  "Greedy match", "Gate"]


def _gate_cell(r: dict) -> str:
    g = r.get("gate") if isinstance(r.get("gate"), dict) else None
    if not g:
        return DASH
    return "pass" if g.get("passed") else "FAIL: " + "; ".join(g.get("failures") or [])


def _bench_row(r: dict, sizes: dict) -> list[str]:
    q = r.get("quality") if isinstance(r.get("quality"), dict) else {}
    size = r.get("artifact_mb") if _num(r.get("artifact_mb")) is not None else sizes.get(
        r.get("target"))
    return [fmt_value(r.get("target")), fmt_value(r.get("runtime")), fmt(size),
            fmt(r.get("load_s"), ".2f"), fmt_pm(r.get("ttft_ms")), fmt_pm(r.get("prefill_tps")),
            fmt_pm(r.get("decode_tps")), fmt(r.get("peak_rss_mb"), ".0f"),
            fmt(q.get("kl_mean"), ".3g"), fmt_pct(q.get("top1_agreement")),
            fmt(q.get("ppl"), ".2f"), fmt(q.get("ppl_delta"), "+.2f"),
            fmt_pct(q.get("greedy_match")), _gate_cell(r)]


def _bench_section(bench: list[dict], targets: list[dict], have_plot: bool) -> tuple:
    sizes = {t.get("name"): t.get("size_mb") for t in targets}
    blocks: list = [("table", _BENCH_HEADERS, [_bench_row(r, sizes) for r in bench],
                     "ll" + "r" * (len(_BENCH_HEADERS) - 2))]
    refs = {fmt(r["quality"].get("ref_ppl"), ".2f") for r in bench
            if isinstance(r.get("quality"), dict)}
    pruned = any(r.get("target") == "pruned" and r.get("runtime") == "torch" for r in bench)
    model = "the pruned full-precision model" if pruned else "the merged full-precision model"
    note = ("Rates are mean ± std over the repetitions, tokenisation excluded. Quality is "
            f"measured against {model}: KL divergence of next-token "
            "distributions (nats), top-1 agreement, perplexity on held-out text and its change, "
            "and the share of fixed prompts whose greedy output matches. Gate: the thresholds for "
            "the target's format and precision (toolchain/quality/gates.py).")
    if refs:
        note += f" Reference perplexity: {', '.join(sorted(refs))}."
    blocks.append(("p", note))
    if have_plot:
        blocks.append(("img", "latency", "Prefill and decode tokens/s and time to first token"))
    return ("Benchmark", blocks)


def _imatrix_pairs(bench: list[dict], targets: list[dict]) -> list[tuple[dict, dict]]:
    """(without, with) bench rows of targets of one format and precision differing only in imatrix."""
    flags = {t.get("name"): bool(t.get("imatrix")) for t in targets}
    by_key: dict[tuple, dict[bool, dict]] = {}
    for r in bench:
        if r.get("target") in flags and isinstance(r.get("quality"), dict):
            key = (r.get("format"), r.get("precision"), r.get("runtime"))
            by_key.setdefault(key, {})[flags[r["target"]]] = r
    return [(v[False], v[True]) for v in by_key.values() if False in v and True in v]


def _imatrix_section(pairs: list[tuple[dict, dict]]) -> tuple:
    rows = []
    for without, with_ in pairs:
        q0, q1 = without["quality"], with_["quality"]
        rows.append([fmt_value(without.get("precision")), f"{fmt(q0.get('kl_mean'), '.3g')} → {fmt(q1.get('kl_mean'), '.3g')}",
                     f"{fmt_pct(q0.get('top1_agreement'))} → {fmt_pct(q1.get('top1_agreement'))}",
                     f"{fmt(q0.get('ppl_delta'), '+.2f')} → {fmt(q1.get('ppl_delta'), '+.2f')}",
                     f"{fmt_pct(q0.get('greedy_prefix'))} → {fmt_pct(q1.get('greedy_prefix'))}"])
    note = ("Same quantisation type without → with an importance matrix computed on the calibration sample "
            "(llama-imatrix's statistic: per input column, the mean square activation). Lower KL and ΔPPL, "
            "higher top-1 and greedy prefix are better.")
    return ("What the importance matrix buys", [("table", ["Type", "KL mean", "Top-1", "ΔPPL", "Greedy prefix"],
                                                 rows, "lllll"), ("p", note)])


def _decode_median(r: dict | None, key: str = "decode_tps") -> float | None:
    stat = r.get(key) if isinstance(r, dict) else None
    return _num(stat.get("median")) if isinstance(stat, dict) else _num(stat)


def _anchor_row(bench: list[dict]) -> dict | None:
    """llama.cpp's Q4_0, the speed anchor ONNX targets are compared with (issue: int4 >= Q4_0)."""
    return next((r for r in bench if r.get("format") == "gguf" and r.get("precision") == "Q4_0"
                 and r.get("runtime") == "llama.cpp"), None)


def _ratios_section(bench: list[dict], anchor: dict) -> tuple:
    torch_row = next((r for r in bench if r.get("runtime") == "torch"), None)
    rows = []
    for r in bench:
        if r.get("format") != "onnx":
            continue
        cells = [fmt_value(r.get("target")), fmt_value(r.get("runtime"))]
        for base in (anchor, torch_row):
            for key in ("decode_tps", "prefill_tps"):
                a, b = _decode_median(r, key), _decode_median(base, key)
                cells.append(f"{a / b:.2f}x" if a and b else DASH)
        rows.append(cells)
    note = (f"Medians, same threads and settings (a stage reused from the cache keeps the figures it measured "
            f"then; --force bench re-measures every row together). Anchor: {fmt_value(anchor.get('target'))} "
            "(llama.cpp Q4_0); above 1.00x the ONNX target is faster. benchmarks/onnx_speed.py adds the obvious "
            "path (optimum export + onnxruntime quantize_dynamic) and a per-operator profile.")
    headers = ["Target", "Runtime", "Decode vs Q4_0", "Prefill vs Q4_0", "Decode vs torch", "Prefill vs torch"]
    return ("ONNX speed against llama.cpp Q4_0", [("table", headers, rows, "llrrrr"), ("p", note)])


BROWSER_DECODE_GOAL = 0.5  # browser wasm decode at least half native onnxruntime's on the same file


def _browser_section(bench: list[dict]) -> tuple:
    """Each browser row beside native onnxruntime on the same bundle (the same ONNX file as wasm)."""
    rows = []
    for r in bench:
        info = (r.get("machine") or {}).get("browser") if isinstance(r.get("machine"), dict) else None
        if not isinstance(info, dict) or r.get("runtime") == "browser-webllm":  # its own section
            continue
        nat = next((n for n in bench if n.get("target") == r.get("target") and n.get("runtime") == "onnxruntime"), None)
        adapter = info.get("adapter_info") if info.get("device") == "webgpu" else None
        where = (f"{adapter.get('vendor')} {adapter.get('architecture')}".strip() if isinstance(adapter, dict)
                 else f"{info.get('threads') or 1} thread(s), {'isolated' if info.get('crossOriginIsolated') else 'NOT isolated'}"
                 f"{', ' + info['wasm_build'] + ' build' if info.get('wasm_build') else ''}")
        ratios = []
        for key in ("decode_tps", "prefill_tps"):
            a, b = _decode_median(r, key), _decode_median(nat, key)
            ratios.append(a / b if a and b else None)
        goal = DASH
        if info.get("device") == "wasm" and ratios[0] is not None:
            goal = "met" if ratios[0] >= BROWSER_DECODE_GOAL else "missed"
        check = info.get("tokenizer_check") or {}
        rows.append([fmt_value(r.get("target")), fmt_value(info.get("device")), fmt_value(info.get("dtype")), where,
                     fmt(info.get("model_load_s"), ".2f"), fmt_pm(r.get("decode_tps")),
                     *(f"{x:.2f}x" if x else DASH for x in ratios), goal,
                     ("same ids" if check.get("ok") else f"{len(check.get('mismatches') or [])} mismatch(es)")
                     if check else DASH])
    headers = ["Target", "Device", "Dtype", "Backend", "Model load s", "Decode tok/s", "Decode vs native",
               "Prefill vs native", f"Goal ≥{BROWSER_DECODE_GOAL:.1f}x", "Tokenizer"]
    note = ("The bundle's own page in headless chromium (transformers.js + onnxruntime-web), against native "
            "onnxruntime (CPU, same threads) on the same ONNX file; medians of the same run. wasm uses several threads "
            "only when the page is cross-origin isolated (the driver serves COOP/COEP headers); its kernels are "
            "128-bit SIMD without the AVX2/VNNI paths native MLAS takes. WebGPU without a GPU runs on SwiftShader, "
            "a CPU emulation: a correctness check, not a speed figure. Peak RSS of a browser row is the page's JS and wasm "
            "memory after its benchmark (measureUserAgentSpecificMemory), not the browser processes' RSS. Tokenizer: the page's token ids for the fixed "
            "strings and chat renderings against transformers'.")
    return ("Browser against native", [("table", headers, rows, "llll" + "r" * 6), ("p", note)])


def _settings_section(bench: list[dict]) -> tuple:
    rows = []
    for r in bench:
        s = r.get("settings") if isinstance(r.get("settings"), dict) else {}
        m = r.get("machine") if isinstance(r.get("machine"), dict) else {}
        m = m["before"] if isinstance(m.get("before"), dict) else m  # state sampled before the timed runs
        rows.append([fmt_value(r.get("target")), fmt_value(r.get("runtime")),
                     *(fmt_value(s.get(k)) for k in
                       ("threads", "prompt_tokens", "gen_tokens", "repetitions", "warmup")),
                     fmt_value(m.get("cpus")), fmt(m.get("busy_cores"), ".2f"), fmt(m.get("loadavg_1m"), ".2f")])
    headers = ["Target", "Runtime", "Threads", "Prompt tokens", "Gen tokens", "Repetitions",
               "Warm-up", "CPUs", "CPUs busy elsewhere", "Load (1 min)"]
    return ("Settings", [("table", headers, rows, "ll" + "r" * 8)])


def _warnings_section(bench: list[dict]) -> tuple:
    items = [f"{plots.row_label(r)}: {w}" for r in bench for w in r.get("warnings") or []]
    return ("Warnings", [("list", items)] if items else [("p", "None.")])


def _stages_section(stages: list[dict]) -> tuple:
    rows = [[fmt_value(s.get("stage")), str(s.get("key") or DASH)[:KEY_CHARS],
             "cached" if s.get("cached") else "ran", fmt_duration(s.get("wall_s"))]
            for s in stages]
    return ("Stages", [("table", ["Stage", "Key", "Status", "Wall time"], rows, "lllr")])


def _dicts(x: Any) -> list[dict]:
    return [e for e in x if isinstance(e, dict)] if isinstance(x, list) else []


def exporter_sections() -> list[tuple[str, object]]:
    """(exporter name, its report module) for every exporter whose table row names one: the module's
    ``collect(figures)`` gives the rows report.json keeps under the exporter's name, ``section(rows, bench)``
    the section built from them."""
    import importlib

    from toolchain.pipeline.registry import EXPORTERS

    return [(e.name, importlib.import_module(e.report)) for e in EXPORTERS if e.report]


def build_sections(data: dict, have: set[str]) -> tuple[str, list[tuple]]:
    """The report's title and sections from plain (jsonable) data; have = plot keys written."""
    run = data.get("run") if isinstance(data.get("run"), dict) else {}
    title = f"edgesmith report — {run.get('name') or 'run'}"
    sections = [_run_section(run)]
    if isinstance(data.get("model"), dict):
        sections.append(_model_section(data["model"]))
    if isinstance(data.get("train"), dict):
        sections.append(_train_section(data["train"], "loss" in have))
    if isinstance(data.get("qlora_merge"), dict):
        sections.append(_qlora_merge_section(data["qlora_merge"]))
    if isinstance(data.get("pruning"), dict):
        from toolchain.report import pruning

        sections.append(pruning.section(data["pruning"], "importance" in have, "variants" in have))
    if isinstance(data.get("task"), dict):
        sections.append(_task_section(data["task"], "task" in have))
    targets, bench = _dicts(data.get("targets")), _dicts(data.get("bench"))
    if targets:
        sections.append(_targets_section(targets))
    if bench:
        sections.append(_bench_section(bench, targets, "latency" in have))
        pairs = _imatrix_pairs(bench, targets)
        if pairs:
            sections.append(_imatrix_section(pairs))
        anchor = _anchor_row(bench)
        if anchor and any(r.get("format") == "onnx" for r in bench):
            sections.append(_ratios_section(bench, anchor))
        if any(isinstance((r.get("machine") or {}).get("browser"), dict) for r in bench
               if isinstance(r.get("machine"), dict)):
            sections.append(_browser_section(bench))
    for name, hook in exporter_sections():  # a format's own section (the WebLLM bundle's), from its exporter
        if _dicts(data.get(name)):
            sections.append(hook.section(_dicts(data[name]), bench))
    if bench:
        sections += [_warnings_section(bench), _settings_section(bench)]
    if _dicts(data.get("stages")):
        sections.append(_stages_section(_dicts(data["stages"])))
    return title, sections


# ---------------------------------------------------------------- rendering

def _md_cell(text: str) -> str:
    """A table cell or list item: pipes escaped, one line, and '<' as an entity so model
    output such as '<|im_end|>' or '<b>' shows as text rather than HTML."""
    return (text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;")
            .replace("\n", " "))


def render_markdown(title: str, sections: list[tuple], generated: str) -> str:
    out = [f"# {title}", "", f"_Generated {generated}_", ""]
    for name, blocks in sections:
        out += [f"## {name}", ""]
        for block in blocks:
            kind = block[0]
            if kind == "kv":
                out += [f"- **{k}:** {v}" for k, v in block[1]]
            elif kind == "table":
                _, headers, rows, align = block
                out.append("| " + " | ".join(_md_cell(h) for h in headers) + " |")
                out.append("|" + "|".join("---:" if a == "r" else "---" for a in align) + "|")
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            elif kind == "list":
                out += [f"- {_md_cell(item)}" for item in block[1]]
            elif kind == "p":
                out.append(block[1])
            elif kind == "img":
                out.append(f"![{block[2]}]({PLOTS[block[1]]})")
            out.append("")
    return "\n".join(out)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;
background:#fafafa}
main{max-width:1100px;margin:0 auto;padding:1.5rem}
h1{font-size:1.5rem;margin:0 0 .2rem}h2{font-size:1.15rem;margin:1.6rem 0 .5rem;
border-bottom:1px solid #ddd;padding-bottom:.2rem}
.gen{color:#777;font-size:.85rem}
table{border-collapse:collapse;font-size:.85rem;margin:.4rem 0;background:#fff}
th,td{border:1px solid #ddd;padding:.25rem .5rem;vertical-align:top}
th{background:#f0f0f0;text-align:left}td.r{text-align:right;white-space:nowrap}
table.kv th{width:11rem}.wide{overflow-x:auto}
img{max-width:100%;height:auto;border:1px solid #eee;background:#fff;margin:.4rem 0}
p{font-size:.9rem;max-width:60rem}
"""


def render_html(title: str, sections: list[tuple], generated: str,
                images: dict[str, bytes]) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{e(title)}</title><style>{_CSS}</style></head><body><main>",
           f"<h1>{e(title)}</h1>", f'<p class="gen">Generated {e(generated)}</p>']
    for name, blocks in sections:
        out.append(f"<h2>{e(name)}</h2>")
        for block in blocks:
            kind = block[0]
            if kind == "kv":
                out.append('<table class="kv">' + "".join(
                    f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in block[1]) + "</table>")
            elif kind == "table":
                _, headers, rows, align = block
                head = "".join(f"<th>{e(h)}</th>" for h in headers)
                body = "".join("<tr>" + "".join(
                    f'<td class="{a}">{e(c)}</td>' for c, a in zip(row, align)) + "</tr>"
                    for row in rows)
                out.append(f'<div class="wide"><table><thead><tr>{head}</tr></thead>'
                           f"<tbody>{body}</tbody></table></div>")
            elif kind == "list":
                out.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in block[1]) + "</ul>")
            elif kind == "p":
                out.append(f"<p>{e(block[1])}</p>")
            elif kind == "img" and block[1] in images:
                b64 = base64.b64encode(images[block[1]]).decode("ascii")
                out.append(f'<img src="data:image/png;base64,{b64}" alt="{e(block[2])}">')
    out.append("</main></body></html>")
    return "\n".join(out)


# ---------------------------------------------------------------- writing

def atomic_write(path: Path, content: bytes | str) -> Path:
    """Write content to path through a temporary file in the same directory and a rename."""
    write_bytes_atomic(path, content.encode("utf-8") if isinstance(content, str) else content)
    return path


def _importance_png(pruning) -> bytes | None:
    structured = pruning.get("structured") if isinstance(pruning, dict) else None
    if not isinstance(structured, dict):
        return None
    calib = structured.get("calibration") if isinstance(structured.get("calibration"), dict) else {}
    return plots.importance_png(calib.get("angular_distance"), structured.get("dropped_layers") or ())


def _variants_png(pruning) -> bytes | None:
    from toolchain.report.pruning import PAYS, variant_points

    doc = pruning.get("variants") if isinstance(pruning, dict) else None
    return plots.variants_png(variant_points(doc), goal=PAYS) if isinstance(doc, dict) else None


def write_report(data: dict, out_dir: Path) -> list[Path]:
    """Write report.json, report.md, report.html and the plots the data allows into out_dir.

    Returns the written paths, plots first. A plot whose data is missing is not drawn, and a
    stale copy of it from an earlier report in out_dir is removed so the files agree.
    """
    if not isinstance(data, dict):
        raise TypeError(f"report data must be a dict, got {type(data).__name__}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clean = jsonable(data)
    generated = datetime.now(timezone.utc).isoformat(timespec="seconds")
    train = clean.get("train") if isinstance(clean.get("train"), dict) else {}
    pngs = {"latency": plots.latency_png(_dicts(clean.get("bench"))),
            "loss": plots.loss_png(_dicts(train.get("log_history"))),
            "task": plots.task_png(clean.get("task")),
            "importance": _importance_png(clean.get("pruning")),
            "variants": _variants_png(clean.get("pruning"))}
    images = {k: v for k, v in pngs.items() if v}
    written = []
    for key, name in PLOTS.items():
        if key in images:
            written.append(atomic_write(out_dir / name, images[key]))
        else:
            with contextlib.suppress(FileNotFoundError):
                (out_dir / name).unlink()
    title, sections = build_sections(clean, set(images))
    written.append(atomic_write(out_dir / "report.md",
                                render_markdown(title, sections, generated)))
    written.append(atomic_write(out_dir / "report.html",
                                render_html(title, sections, generated, images)))
    report = {**clean, "generated": generated}
    written.append(atomic_write(out_dir / "report.json",
                                json.dumps(report, indent=2, allow_nan=False,
                                           ensure_ascii=False) + "\n"))
    return written
