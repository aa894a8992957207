"""The sampling and logit-processing functions @mlc-ai/web-llm calls in a model library.

Signatures are those web-llm 0.2.86 uses (``llm_chat.ts``, ``sampleTokenFromLogits``):

====================================  ==========================================================
``softmax_with_temperature``          (logits f32[b, 1, V], temperature f32[b]) -> f32[b, 1, V]
``argsort_probs``                     (probs f32[b, V]) -> (sorted f32[b, V], indices i32[b, V])
``sample_with_top_p``                 (sorted f32[b, V], indices i32[b, V], uniform f32[n],
                                       sample_indices i32[n], top_p f32[b]) -> i32[n]
``apply_logit_bias_inplace``          (logits f32[b, V], pos2seq i32[t], token_ids i32[t],
                                       bias f32[t])
``apply_penalty_inplace``             (logits f32[b, V], seq_ids i32[s], pos2seq i32[t],
                                       token_ids i32[t], token_cnt i32[t], penalties f32[s, 3])
``apply_bitmask_inplace``             (logits f32[b, V], seq_ids i32[s], bitmask i32[b, ceil(V/32)])
====================================  ==========================================================

``b`` and ``n`` are 1 (``SAMPLER_BATCH``) and ``V`` the model's vocabulary for the first three,
fixed at compile time; the logit processors take any sizes.

Greedy decoding in web-llm is ``temperature = max(1e-6, t)`` followed by the same three calls,
so the softmax treats a temperature at or below ``GREEDY_TEMPERATURE`` as argmax: the maximum
logits share the mass (one-hot without ties), and the sampler then returns ``indices[0]``.

``sample_with_top_p``: with ``c`` the inclusive cumulative sum of the sorted row, the nucleus
ends at the first ``j`` with ``c_j >= top_p`` (else the last position), its mass ``M`` is ``c``
there, and the sampled position is the first whose ``c`` exceeds ``u * M`` (clamped to the
nucleus).
"""

from __future__ import annotations

from tvm import IRModule, relax, te, tirx
from tvm.script import tirx as T

# web-llm samples one sequence with one distribution (numSeqs = numProbs = numSamples = 1); the
# softmax / argsort / top-p functions are built for that batch and the model's vocabulary, static
# sizes the WebGPU code generator needs for every allocation inside a kernel.
SAMPLER_BATCH = 1
GREEDY_TEMPERATURE = 1e-5  # at or below: argmax (web-llm sends 1e-6 for temperature 0)
GPU_THREADS = 256  # threads per workgroup for the in-place kernels (WebGPU's default limit)
PENALTY_COLUMNS = 3  # penalties[s] = (presence, frequency, repetition)
BITMASK_WORD_BITS = 32
F32 = "float32"
I32 = "int32"


# -- softmax ------------------------------------------------------------------------------------
def _softmax_te(logits: te.Tensor, temperature: te.Tensor) -> te.Tensor:
    b, _, v = logits.shape
    greedy = tirx.const(GREEDY_TEMPERATURE, F32)

    def scaled(i, j):
        return tirx.Select(temperature[i] > greedy, logits[i, 0, j] / temperature[i], logits[i, 0, j])

    r = te.reduce_axis((0, v), name="r")
    row_max = te.compute((b,), lambda i: te.max(scaled(i, r), axis=r), name="row_max")
    weight = te.compute(
        (b, v),
        lambda i, j: tirx.Select(
            temperature[i] > greedy,
            te.exp(scaled(i, j) - row_max[i]),
            (logits[i, 0, j] == row_max[i]).astype(F32),
        ),
        name="weight",
    )
    r2 = te.reduce_axis((0, v), name="r2")
    total = te.compute((b,), lambda i: te.sum(weight[i, r2], axis=r2), name="row_sum")
    return te.compute((b, 1, v), lambda i, _, j: weight[i, j] / total[i], name="softmax")


def _attach_softmax(bb: relax.BlockBuilder, vocab: int) -> None:
    b, v = SAMPLER_BATCH, vocab
    logits = relax.Var("logits", relax.TensorType((b, 1, v), F32))
    temperature = relax.Var("temperature", relax.TensorType((b,), F32))
    with bb.function("softmax_with_temperature", [logits, temperature]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit_te(_softmax_te, logits, temperature,
                                            primfunc_name_hint="softmax_with_temperature_kernel"))
        bb.emit_func_output(out)


def _loops(gpu: bool):
    if gpu:
        return (lambda n: T.thread_binding(n, thread="blockIdx.x"),
                lambda n: T.thread_binding(n, thread="threadIdx.x"))
    return (lambda n: T.serial(n)), (lambda n: T.serial(n))


# -- argsort ------------------------------------------------------------------------------------
# A bitonic sort over the row padded to a power of two (padding: -inf, sorted last), descending by
# probability and ascending by token id among equal ones. Each (k, j) stage is one kernel launch
# of width/2 compare-exchange threads, the stage loops run on the host. (TVM 0.27's GPU argsort
# launches on blockIdx.z, which its WebGPU code generator refuses.)
def _bitonic_argsort(gpu: bool, vocab: int) -> tirx.PrimFunc:
    outer, inner = _loops(gpu)
    tx = GPU_THREADS
    width = max(2, 1 << (vocab - 1).bit_length())
    log_width = width.bit_length() - 1
    half = width // 2
    groups = max(1, half // tx)
    lanes = min(tx, half)

    @T.prim_func(s_tir=True, private=True)
    def kernel(var_probs: T.handle, var_keys: T.handle, var_ids: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        batch = T.int32()
        probs = T.match_buffer(var_probs, (batch, vocab), "float32")
        keys = T.match_buffer(var_keys, (batch, width), "float32")
        ids = T.match_buffer(var_ids, (batch, width), "int32")
        for b0 in range(batch):
            for p0 in outer(width // lanes):
                for p1 in inner(lanes):
                    with T.sblock("init"):
                        vb = T.axis.spatial(batch, b0)
                        vj = T.axis.spatial(width, p0 * lanes + p1)
                        keys[vb, vj] = T.if_then_else(vj < vocab, probs[vb, T.min(vj, vocab - 1)],
                                                      T.min_value("float32"))
                        ids[vb, vj] = T.Cast("int32", vj)
            for stage in range(log_width):
                for step in range(stage + 1):
                    for p0 in outer(groups):
                        for p1 in inner(lanes):
                            with T.sblock("exchange"):
                                vb = T.axis.opaque(batch, b0)
                                vt = T.axis.opaque(half, p0 * lanes + p1)
                                vs = T.axis.opaque(log_width, stage)
                                vr = T.axis.opaque(log_width, step)
                                T.reads(keys[vb, 0:width], ids[vb, 0:width])
                                T.writes(keys[vb, 0:width], ids[vb, 0:width])
                                dist = T.shift_left(T.int32(1), vs - vr)
                                lo = (vt // dist) * dist * 2 + vt % dist
                                hi = lo + dist
                                # "first" = ranks earlier: larger key, or equal key and smaller id
                                lo_first = T.bitwise_or(
                                    keys[vb, lo] > keys[vb, hi],
                                    T.bitwise_and(keys[vb, lo] == keys[vb, hi],
                                                  ids[vb, lo] < ids[vb, hi]))
                                descending = T.bitwise_and(lo, T.shift_left(T.int32(2), vs)) == 0
                                if T.Cast("int32", lo_first) != T.Cast("int32", descending):
                                    key_lo: T.float32 = keys[vb, lo]
                                    id_lo: T.int32 = ids[vb, lo]
                                    keys[vb, lo] = keys[vb, hi]
                                    ids[vb, lo] = ids[vb, hi]
                                    keys[vb, hi] = key_lo
                                    ids[vb, hi] = id_lo

    return kernel


def _attach_argsort(bb: relax.BlockBuilder, gpu: bool, vocab: int) -> None:
    b = SAMPLER_BATCH
    probs = relax.Var("probs", relax.TensorType((b, vocab), F32))
    width = max(2, 1 << (vocab - 1).bit_length())
    sort = bb.add_func(_bitonic_argsort(gpu, vocab), "bitonic_argsort")
    with bb.function("argsort_probs", [probs]):
        with bb.dataflow():
            padded = bb.emit(relax.call_tir(sort, [probs], out_ty=[
                relax.TensorType((b, width), F32), relax.TensorType((b, width), I32)]))
            keys = bb.emit(relax.TupleGetItem(padded, 0))
            ids = bb.emit(relax.TupleGetItem(padded, 1))
            ordered = bb.emit(relax.op.strided_slice(keys, axes=[1], begin=[0], end=[vocab]))
            order = bb.emit(relax.op.strided_slice(ids, axes=[1], begin=[0], end=[vocab]))
            out = bb.emit_output(relax.Tuple([ordered, order]))
        bb.emit_func_output(out)


# -- top-p sampling -----------------------------------------------------------------------------
# One thread per sample walks the sorted row twice, stopping early: first to the nucleus end (the
# first position whose cumulative mass reaches top_p, else the last), then to the first position
# whose cumulative mass exceeds u * (nucleus mass). A greedy (one-hot) row stops at position 0.
def _top_p_kernel(gpu: bool, vocab: int) -> tirx.PrimFunc:
    outer, inner = _loops(gpu)

    @T.prim_func(s_tir=True, private=True)
    def kernel(var_probs: T.handle, var_ids: T.handle, var_uniform: T.handle, var_rows: T.handle,
               var_top_p: T.handle, var_out: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        batch, num = T.int32(), T.int32()
        probs = T.match_buffer(var_probs, (batch, vocab), "float32")
        ids = T.match_buffer(var_ids, (batch, vocab), "int32")
        uniform = T.match_buffer(var_uniform, (num,), "float32")
        rows = T.match_buffer(var_rows, (num,), "int32")
        top_p = T.match_buffer(var_top_p, (batch,), "float32")
        out = T.match_buffer(var_out, (num,), "int32")
        for p0 in outer(num):
            for p1 in inner(1):
                with T.sblock("sample"):
                    vs = T.axis.spatial(num, p0 + p1)
                    T.reads(probs[0:batch, 0:vocab], ids[0:batch, 0:vocab], uniform[vs],
                            rows[vs], top_p[0:batch])
                    T.writes(out[vs])
                    cum = T.sblock_alloc_buffer((1,), "float32", scope="local")
                    pos = T.sblock_alloc_buffer((1,), "int32", scope="local")
                    last = T.sblock_alloc_buffer((1,), "int32", scope="local")
                    threshold = T.sblock_alloc_buffer((1,), "float32", scope="local")
                    cum[0] = probs[rows[vs], 0]
                    pos[0] = 0
                    while cum[0] < top_p[rows[vs]] and pos[0] < vocab - 1:
                        pos[0] = pos[0] + 1
                        cum[0] = cum[0] + probs[rows[vs], pos[0]]
                    last[0] = pos[0]
                    threshold[0] = uniform[vs] * cum[0]
                    cum[0] = probs[rows[vs], 0]
                    pos[0] = 0
                    while cum[0] <= threshold[0] and pos[0] < last[0]:
                        pos[0] = pos[0] + 1
                        cum[0] = cum[0] + probs[rows[vs], pos[0]]
                    out[vs] = ids[rows[vs], pos[0]]

    return kernel


def _attach_sample_with_top_p(bb: relax.BlockBuilder, gpu: bool, vocab: int) -> None:
    b, v, n = SAMPLER_BATCH, vocab, SAMPLER_BATCH
    sorted_probs = relax.Var("sorted_probs", relax.TensorType((b, v), F32))
    sorted_indices = relax.Var("sorted_indices", relax.TensorType((b, v), I32))
    uniform = relax.Var("uniform_samples", relax.TensorType((n,), F32))
    rows = relax.Var("sample_indices", relax.TensorType((n,), I32))
    top_p = relax.Var("top_p", relax.TensorType((b,), F32))
    params = [sorted_probs, sorted_indices, uniform, rows, top_p]
    kernel = bb.add_func(_top_p_kernel(gpu, vocab), "sample_top_p_kernel")
    with bb.function("sample_with_top_p", params):
        with bb.dataflow():
            out = bb.emit_output(relax.call_tir(kernel, params, out_ty=relax.TensorType((n,), I32)))
        bb.emit_func_output(out)


# -- in-place logit processors -------------------------------------------------------------------
# Each kernel is one loop nest over its work items, split into (groups, GPU_THREADS); on a GPU the
# two loops are bound to blockIdx.x / threadIdx.x, on the CPU they stay serial. (The schedule
# primitive `bind` refuses blocks that read and write the same buffer, so the kernels are written
# already split.)
def _logit_bias(gpu: bool) -> tirx.PrimFunc:
    outer, inner = _loops(gpu)
    tx = GPU_THREADS

    @T.prim_func(s_tir=True, private=True)
    def kernel(var_logits: T.handle, var_pos2seq: T.handle, var_ids: T.handle, var_bias: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        batch, vocab, num = T.int32(), T.int32(), T.int32()
        logits = T.match_buffer(var_logits, (batch, vocab), "float32")
        pos2seq = T.match_buffer(var_pos2seq, (num,), "int32")
        ids = T.match_buffer(var_ids, (num,), "int32")
        bias = T.match_buffer(var_bias, (num,), "float32")
        for p0 in outer((num + tx - 1) // tx):
            for p1 in inner(tx):
                with T.sblock("bias"):
                    vt = T.axis.spatial(num, p0 * tx + p1)
                    T.where(p0 * tx + p1 < num)
                    logits[pos2seq[vt], ids[vt]] = logits[pos2seq[vt], ids[vt]] + bias[vt]

    return kernel


def _penalty(gpu: bool) -> tirx.PrimFunc:
    outer, inner = _loops(gpu)
    tx = GPU_THREADS

    @T.prim_func(s_tir=True, private=True)
    def kernel(var_logits: T.handle, var_seq_ids: T.handle, var_pos2seq: T.handle,
               var_ids: T.handle, var_cnt: T.handle, var_pen: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        batch, vocab, num, nseq = T.int32(), T.int32(), T.int32(), T.int32()
        logits = T.match_buffer(var_logits, (batch, vocab), "float32")
        seq_ids = T.match_buffer(var_seq_ids, (nseq,), "int32")
        pos2seq = T.match_buffer(var_pos2seq, (num,), "int32")
        ids = T.match_buffer(var_ids, (num,), "int32")
        cnt = T.match_buffer(var_cnt, (num,), "int32")
        pen = T.match_buffer(var_pen, (nseq, 3), "float32")
        for p0 in outer((num + tx - 1) // tx):
            for p1 in inner(tx):
                with T.sblock("penalty"):
                    vt = T.axis.spatial(num, p0 * tx + p1)
                    T.where(p0 * tx + p1 < num)
                    # presence and frequency subtract; repetition then divides a positive
                    # logit and multiplies a negative one
                    logits[seq_ids[pos2seq[vt]], ids[vt]] = (
                        logits[seq_ids[pos2seq[vt]], ids[vt]] - pen[pos2seq[vt], 0]
                        - T.Cast("float32", cnt[vt]) * pen[pos2seq[vt], 1]
                    )
                    logits[seq_ids[pos2seq[vt]], ids[vt]] = T.Select(
                        logits[seq_ids[pos2seq[vt]], ids[vt]] < T.float32(0),
                        logits[seq_ids[pos2seq[vt]], ids[vt]] * pen[pos2seq[vt], 2],
                        logits[seq_ids[pos2seq[vt]], ids[vt]] / pen[pos2seq[vt], 2],
                    )

    return kernel


def _bitmask(gpu: bool) -> tirx.PrimFunc:
    outer, inner = _loops(gpu)
    tx = GPU_THREADS
    bits = BITMASK_WORD_BITS

    @T.prim_func(s_tir=True, private=True)
    def kernel(var_logits: T.handle, var_seq_ids: T.handle, var_mask: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        batch, vocab, nseq = T.int32(), T.int32(), T.int32()
        logits = T.match_buffer(var_logits, (batch, vocab), "float32")
        seq_ids = T.match_buffer(var_seq_ids, (nseq,), "int32")
        mask = T.match_buffer(var_mask, (batch, (vocab + bits - 1) // bits), "int32")
        for p0 in outer((nseq * vocab + tx - 1) // tx):
            for p1 in inner(tx):
                with T.sblock("mask"):
                    vs = T.axis.spatial(nseq, (p0 * tx + p1) // vocab)
                    vj = T.axis.spatial(vocab, (p0 * tx + p1) % vocab)
                    T.where(p0 * tx + p1 < nseq * vocab)
                    logits[seq_ids[vs], vj] = T.Select(
                        T.bitwise_and(T.shift_right(mask[seq_ids[vs], vj // bits], vj % bits), 1)
                        == 1,
                        logits[seq_ids[vs], vj],
                        T.min_value("float32"),
                    )

    return kernel


# name -> (kernel factory, argument names and shapes of the Relax wrapper; "b"/"v" are the
# logits' batch and vocab, other letters their own lengths). The VM only exposes Relax functions,
# so each kernel is reached through a wrapper that calls it in place on the logits.
INPLACE_KERNELS = {
    "apply_logit_bias_inplace": (_logit_bias, (
        ("logits", "bv", F32), ("pos2seq_id", "t", I32), ("token_ids", "t", I32),
        ("logit_bias", "t", F32))),
    "apply_penalty_inplace": (_penalty, (
        ("logits", "bv", F32), ("seq_ids", "s", I32), ("pos2seq_id", "t", I32),
        ("token_ids", "t", I32), ("token_cnt", "t", I32), ("penalties", "s3", F32))),
    "apply_bitmask_inplace": (_bitmask, (
        ("logits", "bv", F32), ("seq_ids", "s", I32), ("bitmask", "bw", I32))),
}
SAMPLER_FUNCTIONS = ("softmax_with_temperature", "argsort_probs", "sample_with_top_p",
                     *INPLACE_KERNELS)


def _attach_inplace(bb: relax.BlockBuilder, name: str, kernel: tirx.PrimFunc, args) -> None:
    dims = {c: tirx.Var(c, "int64") for c in "bvtsw"}
    dims["3"] = PENALTY_COLUMNS
    params = [relax.Var(arg, relax.TensorType([dims[c] for c in shape], dtype))
              for arg, shape, dtype in args]
    gv = bb.add_func(kernel, f"{name}_kernel")
    with bb.function(name, params):
        out = bb.emit(relax.call_tir_inplace(gv, params, inplace_indices=[0],
                                             out_ty=params[0].ty))
        bb.emit_func_output(out)


def attach_sampler(mod: IRModule, target, vocab_size: int) -> IRModule:
    """``mod`` with the six sampling / logit functions added for ``target``."""
    gpu = target.kind.name != "llvm"
    bb = relax.BlockBuilder(mod)
    _attach_softmax(bb, vocab_size)
    _attach_argsort(bb, gpu, vocab_size)
    _attach_sample_with_top_p(bb, gpu, vocab_size)
    for name, (factory, args) in INPLACE_KERNELS.items():
        _attach_inplace(bb, name, factory(gpu), args)
    return bb.finalize()


__all__ = ["attach_sampler", "SAMPLER_FUNCTIONS", "GREEDY_TEMPERATURE"]
