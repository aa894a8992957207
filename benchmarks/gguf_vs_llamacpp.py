"""edgesmith's GGUF export + quantise against llama.cpp's own tools, on the embedded model.

    python benchmarks/gguf_vs_llamacpp.py [--quant Q4_K_M] [--repeats 3] [--out benchmarks/results]

Anchor path: llama.cpp's ``convert_hf_to_gguf.py`` (from the llama-cpp-python source
distribution, which pip downloads) to an F16 GGUF, then llama.cpp's quantiser. edgesmith's path:
``exporters.gguf.write_gguf`` to F16, then the same quantiser. Both start from the same HF
directory (the embedded SmolLM2-135M-Instruct, dequantised). Reported:

- wall time of each path (median of ``--repeats``) and their ratio (goal: edgesmith <= 1.0x);
- equivalence of the outputs: tensor names, shapes and types, F16 tensor data compared exactly,
  metadata keys that differ, and KL / top-1 between the two quantised files' next-token
  distributions in llama.cpp on held-out text;
- llama.cpp decode tokens/s of the quantised file beside the memory-bandwidth bound of this
  machine (model bytes read per token over measured bandwidth).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
CACHE = Path(os.environ.get("EDGESMITH_CACHE", Path.home() / ".cache" / "edgesmith"))


def llama_cpp_source() -> Path:
    """The vendored llama.cpp tree of the llama-cpp-python sdist (downloaded once, cached)."""
    root = CACHE / "llama-cpp-python-sdist"
    tree = next(root.glob("llama_cpp_python-*/vendor/llama.cpp"), None) if root.exists() else None
    if tree is None:
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        LLAMA_CPP_PYTHON, "-d", str(root)], check=True)
        with tarfile.open(next(root.glob("*.tar.gz"))) as tar:
            tar.extractall(root, filter="data")
        tree = next(root.glob("llama_cpp_python-*/vendor/llama.cpp"))
    return tree


def embedded_hf_dir(work: Path) -> Path:
    from toolchain.core.models import (
        load_model_and_tokenizer,
        resolve_source,
        save_hf_dir,
    )

    out = work / "smollm2-135m-instruct"
    if not (out / "config.json").exists():
        model, tok = load_model_and_tokenizer(resolve_source("smollm2-135m-instruct"))
        save_hf_dir(model, tok, out)
    return out


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def bandwidth_gbs(size_mb: int = 512, repeats: int = 5) -> float:
    """Read bandwidth: sum over a buffer much larger than the caches (best of a few passes)."""
    a = np.ones(size_mb * 2**20 // 8, dtype=np.float64)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        best = max(best, a.nbytes / (time.perf_counter() - t))
    return best / 1e9


def compare_gguf(a: Path, b: Path) -> dict:
    from gguf import GGUFReader

    ra, rb = GGUFReader(a), GGUFReader(b)
    ta = {t.name: t for t in ra.tensors}
    tb = {t.name: t for t in rb.tensors}
    same_data, differ = 0, []
    for name in sorted(set(ta) & set(tb)):
        x, y = ta[name], tb[name]
        if x.tensor_type != y.tensor_type or list(x.shape) != list(y.shape):
            differ.append(f"{name}: {x.tensor_type.name}{list(x.shape)} vs {y.tensor_type.name}{list(y.shape)}")
        elif np.array_equal(np.asarray(x.data), np.asarray(y.data)):
            same_data += 1
        else:
            differ.append(f"{name}: data differs")
    skip = ("general.", "GGUF.")
    ka = {k for k in ra.fields if not k.startswith(skip)}
    kb = {k for k in rb.fields if not k.startswith(skip)}
    return {"tensors": len(ta), "only_edgesmith": sorted(set(ta) - set(tb)), "only_llamacpp": sorted(set(tb) - set(ta)),
            "identical_tensors": same_data, "differing_tensors": differ[:20], "n_differing": len(differ),
            "keys_only_edgesmith": sorted(ka - kb), "keys_only_llamacpp": sorted(kb - ka)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quant", default="Q4_K_M")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()

    from exporters.gguf import write_gguf
    from exporters.gguf.quantize import quantize
    from runtimes.base import log_softmax
    from runtimes.llamacpp_runtime import LlamaCppRuntime
    from toolchain.core.benchschema import BenchSettings
    from toolchain.core.prompts import QUALITY_TEXT

    work = Path(tempfile.mkdtemp(prefix="gguf-bench-"))
    hf = embedded_hf_dir(work)
    tree = llama_cpp_source()
    env = dict(os.environ, PYTHONPATH=str(tree / "gguf-py"))
    ours_f16, ours_q = work / "ours-F16.gguf", work / f"ours-{args.quant}.gguf"
    anchor_f16, anchor_q = work / "anchor-F16.gguf", work / f"anchor-{args.quant}.gguf"

    def ours():
        write_gguf(hf, ours_f16, out_type="F16")
        quantize(ours_f16, ours_q, args.quant, threads=args.threads)

    def anchor():
        subprocess.run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(hf), "--outtype", "f16",
                        "--outfile", str(anchor_f16)], check=True, env=env, capture_output=True)
        quantize(anchor_f16, anchor_q, args.quant, threads=args.threads)

    anchor()  # warm the page cache for both paths alike
    t_anchor, anchor_times = timed(anchor, args.repeats)
    t_ours, our_times = timed(ours, args.repeats)
    f16_cmp = compare_gguf(ours_f16, anchor_f16)

    ids = None
    logits = {}
    results = {}
    for label, path in (("edgesmith", ours_q), ("llama.cpp", anchor_q)):
        rt = LlamaCppRuntime(path, threads=args.threads)
        rt.load()
        if ids is None:
            ids = rt.llm.tokenize(QUALITY_TEXT.encode(), add_bos=False, special=False)[:256]
        logits[label] = log_softmax(rt.logits(ids))
        results[label] = rt.bench(ids, BenchSettings(threads=args.threads, prompt_tokens=128, gen_tokens=64,
                                                     repetitions=3, warmup=1), target=label, load_s=0.0).to_dict()
    p, q = logits["llama.cpp"], logits["edgesmith"]
    kl = float((np.exp(p) * (p - q)).sum(-1).mean())
    top1 = float((p.argmax(-1) == q.argmax(-1)).mean())
    bw = bandwidth_gbs()
    size = ours_q.stat().st_size
    decode = results["edgesmith"]["decode_tps"]["median"]
    bound = bw * 1e9 / size
    summary = {
        "quant": args.quant, "threads": args.threads, "machine_load": os.getloadavg()[0],
        "export_s": {"edgesmith": t_ours, "llama.cpp": t_anchor, "edgesmith_runs": our_times, "llama.cpp_runs": anchor_times},
        "ratio_edgesmith_over_llamacpp": t_ours / t_anchor,
        "f16_comparison": f16_cmp,
        "quantised_outputs": {"kl_mean": kl, "top1_agreement": top1, "tokens": len(ids),
                              "size_edgesmith": size, "size_llamacpp": anchor_q.stat().st_size},
        "decode": {"tokens_per_s": decode, "bandwidth_GBps": bw, "bytes_per_token": size,
                   "bandwidth_bound_tokens_per_s": bound, "share_of_bound": decode / bound},
        "bench": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gguf_vs_llamacpp.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "bench"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
