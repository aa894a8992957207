"""The report's WebLLM section (the ``report`` of the webllm row in the exporter table): each quantisation's weights checked by the NumPy reference, the
model libraries built, and the bundle in chromium beside the wasm onnxruntime-web rows."""
from __future__ import annotations

from typing import Any

from toolchain.quality.gates import verdict
from toolchain.report.format import DASH, fmt, fmt_pct, fmt_pm, fmt_value


def collect(figures: dict) -> dict | None:
    """What the report needs from a webllm export's manifest figures."""
    if figures.get("format") != "webllm":
        return None
    checks = {}
    for quant, chk in (figures.get("reference_check") or {}).items():
        q = chk.get("quality")  # judged on the current gates table, as the bench rows are
        checks[quant] = dict(chk, gate=verdict("webllm", quant, q) or chk.get("gate")) if q else chk
    return {"target": figures.get("target"), "weights": figures.get("weights") or {},
            "reference_check": checks, "libraries": figures.get("libraries") or {},
            "compiler": figures.get("compiler")}


def section(exports: list[dict], bench: list[dict]) -> tuple:
    blocks: list[Any] = []
    rows = []
    for e in exports:
        for quant, w in e["weights"].items():
            chk = e["reference_check"].get(quant) or {}
            q, gate = chk.get("quality") or {}, chk.get("gate") or {}
            lib = e["libraries"].get(quant) or {}
            rows.append([fmt_value(e["target"]), quant, fmt((w.get("bytes") or 0) / 2**20),
                         fmt(w.get("bits_per_param"), ".2f"), fmt(q.get("kl_mean"), ".3g"),
                         fmt_pct(q.get("top1_agreement")), fmt(q.get("ppl_delta"), "+.3f"),
                         fmt(q.get("max_abs_logprob"), ".2g"),
                         ("pass" if gate.get("passed") else "FAIL: " + "; ".join(gate.get("failures") or []))
                         if gate else DASH,
                         (f"{fmt((lib.get('bytes') or 0) / 2**20)} MB, "
                          f"{'cached' if lib.get('cached') else fmt(lib.get('build_s'), '.0f') + ' s'}") if lib else "none"])
    blocks.append(("table", ["Target", "Quant", "Weights MB", "Bits/param", "KL mean", "Top-1", "ΔPPL",
                             "Max |Δ log p|", "Gate", "Model library"], rows, "llrrrrrrll"))
    blocks.append(("p", "Weights: MLC's layout (params_shard_*.bin + tensor-cache.json), read back by an "
                        "independent NumPy forward pass (exporters/webllm/reference.py) and compared with the merged "
                        "model on the reference's quality tokens; gates from toolchain/quality/gates.py (webllm/<quant>). "
                        "Model library: the WebGPU .wasm compiled with apache-tvm and linked with emscripten "
                        "(build time, or cached: the same model config, quantisation and compiler reuse the library)."))
    brows = []
    wasm = [r for r in bench if r.get("runtime") == "browser-wasm"]
    for r in bench:
        if r.get("runtime") != "browser-webllm":
            continue
        q = r.get("quality") if isinstance(r.get("quality"), dict) else {}
        info = (r.get("machine") or {}).get("browser") or {}
        adapter = info.get("adapter_info") or {}
        lim = r.get("limits") if isinstance(r.get("limits"), dict) else None
        cells = [fmt_value(r.get("target")), fmt_value(r.get("precision")),
                 fmt_value(f"{adapter.get('vendor', '')} {adapter.get('architecture', '')}".strip() or None),
                 fmt(info.get("model_load_s") or r.get("load_s"), ".1f"), fmt_pm(r.get("prefill_tps")),
                 fmt_pm(r.get("decode_tps")), fmt_pct(q.get("greedy_match")),
                 (f"short: {lim.get('greedy_prompts')} prompt(s) x {lim.get('greedy_tokens')} greedy tokens, "
                  f"bench {lim.get('prompt_tokens')}+{lim.get('gen_tokens')} tokens") if lim else "full"]
        brows.append(cells)
    for r in wasm:
        info = (r.get("machine") or {}).get("browser") or {}
        brows.append([fmt_value(r.get("target")), f"{fmt_value(info.get('dtype'))} (onnxruntime-web wasm)",
                      f"{info.get('threads') or 1} CPU thread(s)", fmt(info.get("model_load_s"), ".1f"),
                      fmt_pm(r.get("prefill_tps")), fmt_pm(r.get("decode_tps")),
                      fmt_pct((r.get("quality") or {}).get("greedy_match")), "full"])
    if brows:
        blocks.append(("table", ["Target", "Quant / dtype", "Adapter", "Model load s", "Prefill tok/s",
                                 "Decode tok/s", "Greedy match", "Run"], brows, "lllrrrrl"))
        blocks.append(("p", "WebLLM rows: the bundle's page in headless chromium through @mlc-ai/web-llm's own engine "
                            "on WebGPU. Without a GPU the adapter is SwiftShader (Vulkan emulated on the CPU, no "
                            "shader-f16): a correctness check whose speed says nothing of a real GPU, run short (greedy "
                            "parity on the first fixed prompts; logit quality is the NumPy check above). The wasm rows "
                            "(onnxruntime-web on the CPU, same run) are the browser speed on this machine."))
    return ("WebLLM bundle", blocks)
