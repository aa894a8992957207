"""The obvious path to an int8 ONNX of a Hugging Face model, built and measured as a baseline.

    python benchmarks/obvious_onnx.py [--work DIR] [--threads 2] [--repetitions 5] [--no-verify]

What a user would do from the optimum and onnxruntime docs, nothing tuned:

1. ``optimum-cli export onnx --model HF_DIR --task text-generation-with-past OUT`` (optimum-onnx
   0.1.0, defaults: fp32, one ``model.onnx`` with the KV cache as inputs/outputs);
2. ``onnxruntime.quantization.quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8)`` (every
   other argument left at its default: no pre-processing, per-tensor weights, MatMul/Gather
   etc. quantised, activations quantised on the fly).

optimum-onnx 0.1.0 needs transformers < 4.58, so it cannot live in the project's venv
(transformers 5): ``optimum_env()`` installs it once with ``pip --target`` under
``$EDGESMITH_CACHE`` (default ``~/.cache/edgesmith``) with ``--no-deps``, pinning only what must
differ from the venv (transformers 4.57, huggingface-hub < 1, tokenizers 0.22); torch, onnx,
numpy etc. are the venv's (torch is never installed). The export runs in a subprocess with that
directory first on PYTHONPATH.

Both exported directories load in the project's ``runtimes.onnxruntime_runtime.OnnxRuntime``
unchanged: optimum writes ``model.onnx`` (a single file below 2 GB, no external data) with
``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key|value`` (float32,
static kv_heads/head_dim) in and ``logits``, ``present.{i}.key|value`` out.

Verified (SmolLM2-135M-Instruct, the embedded model): transformers 4.57 reads ``rope_theta``
from the top level of config.json and silently uses 10000 without it, so the build checks that
the exported config carries the source's effective rope_theta (an HF dir without the top-level
key raises). The CLI (unless ``--no-verify``) scores both ONNX models against transformers 5
(``TorchRuntime``) with the pipeline's metrics (``quality_against``: 255 held-out tokens, greedy
with the KV cache on 4 chat prompts x 32 tokens). Measured: fp32 top-1 1.000, KL 1.2e-11, max
|log-prob diff| 7.7e-5, greedy 4/4 identical, so the export is faithful. int8 top-1 0.60, KL
0.52, ppl 28.0 vs 15.9, greedy 1/4: dynamic per-tensor int8 activations hurt this model a lot
(per_channel=True or MatMul-only quantisation give top-1 0.64-0.66, not a fix). That is the
honest quality of this baseline.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CACHE = Path(os.environ.get("EDGESMITH_CACHE", Path.home() / ".cache" / "edgesmith"))
OPTIMUM_DIR = CACHE / "optimum-onnx-0.1.0"
# Installed with --no-deps: only the packages whose versions must differ from the project venv.
OPTIMUM_PINS = ["optimum-onnx==0.1.0", "optimum==2.1.*", "transformers==4.57.*",
                "huggingface-hub>=0.34,<1.0", "tokenizers>=0.22,<=0.23.0"]
STAMP = ".edgesmith-build.json"
MODEL_FILE = "model.onnx"


def optimum_env() -> Path:
    """The isolated optimum-onnx install (created on first use); returns the PYTHONPATH entry."""
    done = OPTIMUM_DIR / ".complete"
    if not done.is_file():
        tmp = OPTIMUM_DIR.with_name(OPTIMUM_DIR.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "--no-deps", "--target", str(tmp), *OPTIMUM_PINS], check=True)
        shutil.rmtree(OPTIMUM_DIR, ignore_errors=True)
        tmp.rename(OPTIMUM_DIR)
        _check_optimum_env()
        done.write_text(json.dumps(OPTIMUM_PINS) + "\n")
    return OPTIMUM_DIR


def _optimum_subprocess_env() -> dict:
    paths = [str(OPTIMUM_DIR), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p),
                HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def _check_optimum_env() -> None:
    code = ("import transformers, torch, optimum.exporters.onnx; "
            "assert transformers.__version__.startswith('4.57'), transformers.__version__")
    subprocess.run([sys.executable, "-c", code], check=True, env=_optimum_subprocess_env())


def content_hash(hf_dir: Path) -> str:
    """sha256 over the names and bytes of every file in ``hf_dir``."""
    h = hashlib.sha256()
    for p in sorted(q for q in Path(hf_dir).rglob("*") if q.is_file()):
        h.update(str(p.relative_to(hf_dir)).encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def _built(out: Path, key: str) -> bool:
    stamp = out / STAMP
    return (out / MODEL_FILE).is_file() and stamp.is_file() and json.loads(stamp.read_text()).get("source") == key


def _stamp(out: Path, key: str, **extra) -> None:
    (out / STAMP).write_text(json.dumps({"source": key, **extra}, indent=2) + "\n")


def export_fp32(hf_dir: Path, out: Path) -> None:
    """``optimum-cli export onnx --task text-generation-with-past`` into ``out`` (replaced)."""
    from toolchain.core.models import effective_rope_theta

    optimum_env()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "optimum.commands.optimum_cli", "export", "onnx", "--model", str(hf_dir),
           "--task", "text-generation-with-past", str(tmp)]
    proc = subprocess.run(cmd, env=_optimum_subprocess_env(), capture_output=True, text=True)
    if proc.returncode != 0 or not (tmp / MODEL_FILE).is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"optimum export failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    # transformers 4.57 falls back to rope_theta 10000 when config.json keeps it only under
    # rope_parameters (transformers 5): the exported graph would drift from the model.
    want = effective_rope_theta(json.loads((hf_dir / "config.json").read_text()))
    got = json.loads((tmp / "config.json").read_text()).get("rope_theta")
    if want is not None and (got is None or abs(float(got) - float(want)) > 1e-6 * float(want)):
        shutil.rmtree(tmp)
        raise RuntimeError(f"optimum's transformers read rope_theta={got}, the model has {want}: write a "
                           f"top-level rope_theta into {hf_dir}/config.json (toolchain.core.models.patch_config)")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def quantize_int8(fp32_dir: Path, out: Path) -> None:
    """``quantize_dynamic`` with QInt8 weights and ORT's defaults; copies the non-ONNX files."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    quantize_dynamic(fp32_dir / MODEL_FILE, tmp / MODEL_FILE, weight_type=QuantType.QInt8)
    for p in fp32_dir.iterdir():  # config, generation config, tokenizer, chat template
        if p.is_file() and p.suffix not in (".onnx", ".onnx_data", ".data") and p.name != STAMP:
            shutil.copy2(p, tmp / p.name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def build_obvious_int8(hf_dir: Path, work: Path) -> Path:
    """Export hf_dir with optimum-onnx (task text-generation-with-past) to work/'optimum-fp32', then
    quantize_dynamic to work/'optimum-int8'; copy tokenizer/config files; return the int8 dir
    (containing model.onnx). Cached: skip when already built for the same hf_dir content hash.

    Both directories load in ``OnnxRuntime(dir, threads=...)``; the fp32 one is kept for
    comparison. Raises if the export read a different rope_theta than the model's."""
    hf_dir, work = Path(hf_dir).resolve(), Path(work)
    work.mkdir(parents=True, exist_ok=True)
    key = content_hash(hf_dir)
    fp32, int8 = work / "optimum-fp32", work / "optimum-int8"
    if _built(int8, key):
        return int8
    if not _built(fp32, key):
        t = time.perf_counter()
        export_fp32(hf_dir, fp32)
        _stamp(fp32, key, hf_dir=str(hf_dir), export_s=round(time.perf_counter() - t, 1), pins=OPTIMUM_PINS)
    t = time.perf_counter()
    quantize_int8(fp32, int8)
    _stamp(int8, key, hf_dir=str(hf_dir), quantize_s=round(time.perf_counter() - t, 1),
           quantize="onnxruntime.quantization.quantize_dynamic(weight_type=QuantType.QInt8)")
    return int8


def verify(hf_dir: Path, dirs: dict[str, Path], threads: int) -> dict:
    """Quality of each ONNX dir against transformers 5 on ``hf_dir``, as the pipeline scores it."""
    from transformers import AutoTokenizer

    from runtimes.base import log_softmax, quality_against
    from runtimes.onnxruntime_runtime import OnnxRuntime
    from runtimes.torch_runtime import TorchRuntime
    from toolchain.pipeline.recipe import BenchSection
    from toolchain.stages.reference import reference_inputs, stop_ids

    cfg = BenchSection()
    inputs = reference_inputs(AutoTokenizer.from_pretrained(hf_dir), [], cfg)
    ids, prompts, stops = inputs["quality_ids"], inputs["greedy_prompt_ids"], stop_ids(hf_dir)
    ref = TorchRuntime(hf_dir, threads=threads)
    ref.load()
    ref_lp = log_softmax(ref.logits(ids))
    ref_greedy = [ref.generate(p, cfg.greedy_tokens, stops) for p in prompts]
    out = {}
    for label, d in dirs.items():
        rt = OnnxRuntime(d, threads=threads)  # loads itself on first prefill
        logits = rt.logits(ids)
        greedy = [rt.generate(p, cfg.greedy_tokens, stops) for p in prompts]
        out[label] = quality_against(ref_lp, logits, ids, ref_greedy, greedy).to_dict()
        out[label]["max_abs_logprob_diff"] = float(abs(log_softmax(logits) - ref_lp).max())
    return out


def bench(onnx_dir: Path, threads: int, repetitions: int) -> dict:
    """The pipeline's benchmark (``Runtime.bench``, default BenchSettings: 128-token prompt, 64
    tokens generated) on the pipeline's bench prompt, in a fresh process (as toolchain.stages.benchworker
    does) so peak memory and thread pools are this model's alone."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_bench_here, Path(onnx_dir), threads, repetitions).result()


def _bench_here(onnx_dir: Path, threads: int, repetitions: int) -> dict:
    from transformers import AutoTokenizer

    from runtimes.onnxruntime_runtime import OnnxRuntime
    from toolchain.core.benchschema import BenchSettings
    from toolchain.pipeline.recipe import BenchSection
    from toolchain.stages.reference import reference_inputs

    settings = BenchSettings(threads=threads, repetitions=repetitions)
    ids = reference_inputs(AutoTokenizer.from_pretrained(onnx_dir), [], BenchSection())["bench_prompt_ids"]
    return OnnxRuntime(onnx_dir, threads=threads).bench(ids, settings, target=onnx_dir.name).to_dict()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=str(CACHE / "obvious-onnx"), help="where the HF dir and exports go")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--no-verify", action="store_true", help="skip the comparison with transformers 5")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gguf_vs_llamacpp import embedded_hf_dir

    work = Path(args.work)
    hf = embedded_hf_dir(work)
    t = time.perf_counter()
    int8 = build_obvious_int8(hf, work)
    print(f"built {int8} in {time.perf_counter() - t:.1f}s (0 if cached)", flush=True)
    dirs = {"optimum-fp32": work / "optimum-fp32", "optimum-int8": int8}
    summary: dict = {"threads": args.threads, "load_avg_before": os.getloadavg()}
    if not args.no_verify:
        summary["quality_vs_transformers5"] = verify(hf, dirs, args.threads)
        for label, q in summary["quality_vs_transformers5"].items():
            print(f"{label}: top1 {q['top1_agreement']:.3f}  KL {q['kl_mean']:.2e}  greedy match "
                  f"{q['greedy_match']:.2f}  ppl {q['ppl']:.3f} (ref {q['ref_ppl']:.3f})", flush=True)
    for label, d in dirs.items():
        r = bench(d, args.threads, args.repetitions)
        summary[label] = r
        print(f"{label}: prefill {r['prefill_tps']['median']:.1f} tok/s  decode {r['decode_tps']['median']:.1f} "
              f"tok/s (medians of {r['prefill_tps']['n']})  {r['artifact_mb']:.0f} MiB, peak RSS "
              f"{r['peak_rss_mb']:.0f} MiB  warnings: {r['warnings'] or 'none'}", flush=True)
    summary["load_avg_after"] = os.getloadavg()
    (work / "obvious_onnx.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"details: {work / 'obvious_onnx.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
