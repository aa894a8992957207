"""Compile the WebLLM model library: Relax module -> WebGPU kernels + wasm host code -> ``.wasm``.

``compile_library`` builds the model of ``model.py`` with the sampler of ``sampler.py`` and a
``_metadata`` function for the WebGPU target (an llvm host for wasm32), schedules the TIR with
dlight's default GPU rules, writes object files and links them with TVM's web runtime
(``toolchain.link_library``). The finished ``.wasm`` is cached by a hash of everything it is made
from, so a second call with the same inputs copies the cached file.

``compile_cpu`` builds the same module for the llvm CPU target, for tests.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from toolchain.core.files import copy_atomic, write_text_atomic

# The WebGPU target in TVM 0.27's JSON form: device kernels in WGSL, host code for wasm32.
WEBGPU_TARGET = {"kind": "webgpu", "host": {"kind": "llvm", "mtriple": "wasm32-unknown-unknown-wasm"}}
CPU_TARGET = {"kind": "llvm"}
METADATA_FUNC = "_metadata"
KV_STATE_KIND = "kv_cache"  # mlc-llm's kv_state_kind for attention models
MODEL_TASK = "chat"
MAX_BATCH_SIZE = 1  # web-llm runs one sequence
# source files whose text goes into the library cache key
SOURCES = ("model.py", "quantized.py", "sampler.py", "compile.py")
CACHE_DIR_NAME = "libraries"


def _log(msg: str) -> None:
    print(f"[webllm library] {msg}", file=sys.stderr, flush=True)


def resolve_quant(quant: Any) -> Any:
    """A QuantSpec from its mlc-llm name (the shared table), or the spec object itself."""
    if not isinstance(quant, str):
        return quant
    from exporters.webllm.quant import quant_spec

    return quant_spec(quant)


# -- metadata ---------------------------------------------------------------------------------------
def _param_entry(name: str, param) -> dict:
    return {
        "name": name,
        "shape": [int(s) if isinstance(s, int) else str(s) for s in param.shape],
        "dtype": str(param.dtype),
        "preprocs": [],
        "pipeline_stages": [0],
    }


def base_metadata(model_type: str, dims, spec, named_params) -> dict:
    """The ``_metadata`` JSON (mlc-llm's keys) less ``memory_usage`` (bytes of planned activation
    storage per function), which the pipeline adds after memory planning."""
    return {
        "model_type": model_type,
        "quantization": spec.name,
        "context_window_size": dims.context_window_size,
        "sliding_window_size": -1,
        "attention_sink_size": -1,
        "prefill_chunk_size": dims.prefill_chunk_size,
        "tensor_parallel_shards": 1,
        "pipeline_parallel_stages": 1,
        "disaggregation": False,
        "kv_state_kind": KV_STATE_KIND,
        "max_batch_size": MAX_BATCH_SIZE,
        "active_vocab_size": None,
        "model_task": MODEL_TASK,
        "kv_cache": {
            "num_hidden_layers": dims.num_layers,
            "num_attention_heads": dims.num_heads,
            "num_key_value_heads": dims.num_kv_heads,
            "head_dim": dims.head_dim,
        },
        "params": [_param_entry(n, p) for n, p in named_params],
    }


def _planned_bytes(func) -> int:
    """Bytes of the statically sized storage a Relax function allocates after memory planning."""
    import tvm
    from tvm import relax

    ops = {tvm.ir.Op.get("relax.memory.alloc_storage"), tvm.ir.Op.get("relax.builtin.alloc_tensor")}
    total = [0]

    def visit(expr):
        if not (isinstance(expr, relax.Call) and expr.op in ops):
            return
        shape = expr.args[0]
        if not isinstance(shape, relax.ShapeExpr):
            return
        if not all(isinstance(v, tvm.tirx.IntImm) for v in shape.values):
            return
        n = 1
        for v in shape.values:
            n *= int(v.value)
        if expr.op.name == "relax.builtin.alloc_tensor":
            n *= tvm.DataType(expr.args[1].value).bits // 8
        total[0] += n

    relax.analysis.post_order_visit(func.body, visit)
    return total[0]


def _attach_metadata(metadata: dict):
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name="EdgesmithAttachMetadata")
    def attach(mod, _ctx):
        usage = {gv.name_hint: _planned_bytes(f) for gv, f in mod.functions_items()
                 if isinstance(f, relax.Function)}
        metadata["memory_usage"] = usage  # also seen by the caller (vram estimates)
        bb = relax.BlockBuilder()
        with bb.function(METADATA_FUNC, params=[]):
            bb.emit_func_output(tvm.ir.StringImm(json.dumps(metadata)))
        mod = mod.clone() if hasattr(mod, "clone") else mod
        mod[METADATA_FUNC] = bb.finalize()[METADATA_FUNC]
        return mod

    return attach


# -- pipeline ----------------------------------------------------------------------------------------
def _pipeline(target, metadata: dict, variable_bounds: dict):
    import tvm
    from tvm import relax
    from tvm.s_tir import dlight as dl

    gpu = target.kind.name != "llvm"
    schedule = (
        [dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                 dl.gpu.GeneralReduction(), dl.gpu.Fallback())]
        if gpu else []
    )

    @tvm.transform.module_pass(opt_level=0, name="EdgesmithWebLLMPipeline")
    def pipeline(mod, _ctx):
        with target:
            for gv, func in list(mod.functions_items()):
                if isinstance(func, relax.Function):
                    mod[gv] = func.with_attr("tir_var_upper_bound", variable_bounds)
            seq = tvm.transform.Sequential([
                relax.backend.DispatchSampling(),
                relax.backend.DispatchSortScan(),
                # matmul(x, permute_dims(w)) as one kernel reading w [out, in]: no per-call
                # transposed copy of each weight (the tied lm_head's would be the whole table)
                relax.transform.FuseTransposeMatmul(),
                relax.transform.LegalizeOps(),
                relax.transform.AnnotateTIROpPattern(),
                relax.transform.FoldConstant(),
                relax.transform.FuseOps(),
                relax.transform.FuseTIR(),
                relax.transform.DeadCodeElimination(),
                *schedule,
                relax.transform.RewriteDataflowReshape(),
                relax.transform.ToNonDataflow(),
                relax.transform.RemovePurityChecking(),
                relax.transform.CallTIRRewrite(),
                relax.transform.StaticPlanBlockMemory(),
                _attach_metadata(metadata),
                relax.transform.LowerAllocTensor(),
                relax.transform.KillAfterLastUse(),
                relax.transform.LowerRuntimeBuiltin(),
                relax.transform.ComputePrimValue(),
                relax.transform.VMShapeLower(),
                relax.transform.AttachGlobalSymbol(),
            ])
            return seq(mod)

    return pipeline


def build_ir(model_type: str, model_config: dict, quant: Any, target) -> tuple[Any, dict]:
    """(Relax IRModule with the model, sampler and KV-cache functions; metadata less memory)."""
    from .model import build_model
    from .sampler import attach_sampler

    spec = resolve_quant(quant)
    model, dims = build_model(model_type, model_config, spec, target)
    mod, named_params = model.export_tvm(spec=model.get_default_spec())[:2]
    mod = attach_sampler(mod, target, dims.vocab_size)
    return mod, base_metadata(model_type, dims, spec, named_params)


def _build(model_type: str, model_config: dict, quant: Any, target_dict: dict, system_lib: bool):
    import tvm
    from tvm import relax
    from tvm.target import Target

    from .model import Dims

    target = Target(target_dict)
    dims = Dims.from_config(model_type, model_config)
    bounds = {"seq_len": dims.prefill_chunk_size, "total_seq_len": dims.context_window_size,
              "batch_size": MAX_BATCH_SIZE}
    with target:
        mod, metadata = build_ir(model_type, model_config, quant, target)
    pipeline = _pipeline(target, metadata, bounds)
    with tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
        ex = relax.build(mod, target, relax_pipeline=pipeline, system_lib=system_lib)
    return ex, metadata


def compile_cpu(model_type: str, model_config: dict, quant: Any):
    """The library module built for the llvm CPU target: (relax Executable, metadata dict)."""
    return _build(model_type, model_config, quant, CPU_TARGET, system_lib=False)


def _source_hash() -> str:
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in SOURCES:
        h.update(name.encode())
        h.update((here / name).read_bytes())
    return h.hexdigest()


def library_cache_key(model_type: str, model_config: dict, quant: Any) -> str:
    """Hash of (model_type, model_config, quant, tvm version, our sources, target, web runtime)."""
    import tvm

    from . import toolchain

    spec = resolve_quant(quant)
    payload = json.dumps({
        "model_type": model_type,
        "model_config": model_config,
        "quant": spec.name,
        "tvm": tvm.__version__,
        "sources": _source_hash(),
        "target": WEBGPU_TARGET,
        "runtime": toolchain.runtime_key(),  # emcc version, runtime sources, link flags
    }, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def compile_library(model_type: str, model_config: dict, quant: str, out_wasm: Path, *,
                    cache_dir: Path | None = None) -> dict:
    """Build (or reuse) the WebGPU ``.wasm`` model library and copy it to ``out_wasm``.

    Returns ``{"path", "size_bytes", "build_s", "compile_s", "link_s", "cached", "key",
    "metadata"}``; ``build_s`` is the whole call.
    """
    from . import toolchain

    started = time.perf_counter()
    out_wasm = Path(out_wasm)
    key = library_cache_key(model_type, model_config, quant)
    root = Path(cache_dir) if cache_dir is not None else toolchain._cache_root()
    cached = root / CACHE_DIR_NAME / f"{key}.wasm"
    meta_file = cached.with_suffix(".json")
    compile_s = link_s = 0.0
    hit = cached.is_file() and meta_file.is_file()
    if hit:
        metadata = json.loads(meta_file.read_text())
        _log(f"reusing {cached.name}")
    else:
        t0 = time.perf_counter()
        ex, metadata = _build(model_type, model_config, quant, WEBGPU_TARGET, system_lib=True)
        compile_s = time.perf_counter() - t0
        with tempfile.TemporaryDirectory(prefix="webllm-lib-") as ws:
            objects = toolchain.export_objects(ex, Path(ws) / "objects")
            t1 = time.perf_counter()
            linked = toolchain.link_library(objects, Path(ws) / "lib.wasm", cache_dir=cache_dir)
            link_s = time.perf_counter() - t1
            cached.parent.mkdir(parents=True, exist_ok=True)
            copy_atomic(linked, cached)
        write_text_atomic(meta_file, json.dumps(metadata, indent=1))
    out_wasm.parent.mkdir(parents=True, exist_ok=True)
    copy_atomic(cached, out_wasm)
    return {
        "path": out_wasm,
        "size_bytes": out_wasm.stat().st_size,
        "build_s": round(time.perf_counter() - started, 2),
        "compile_s": round(compile_s, 2),
        "link_s": round(link_s, 2),
        "cached": hit,
        "key": key,
        "metadata": metadata,
    }
