"""Every numeric tolerance the tests use, in one place, each with its reason.

A tier is a ``Tier``: the bound(s) a comparison must stay within and ``why``, which says what was
compared, what was measured and how large the bug is that the bound must still catch. Tests import
the tiers by name (``from tests.tolerances import ONNX_FP32_LOGITS``) and never write a tolerance
as a literal; tests/test_tolerances.py keeps it so. Where two tests compare the same kind of
numbers for the same reason they share a tier; a value whose reason was never written down says so.

The tiers are grouped by what they compare: fp32 against fp32 (only summation order differs),
the ONNX precisions (fp16, int8/int4 codecs against numpy emulations or dequantised weights),
the GGUF writer and quantiser against transformers and llama.cpp, llama.cpp's LoRA adapters,
WebLLM weights and libraries, browser runtimes against native ones, and the quickstart's
end-to-end bounds.
"""
from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True, kw_only=True)
class Tier:
    """The bound(s) of one comparison and the reason for them. Only the fields a tier sets apply."""

    why: str
    atol: float | None = None  # max |got - want|, in the units of the values compared
    rtol: float | None = None  # the relative term, as numpy.testing.assert_allclose reads it
    kl: float | None = None  # max KL(reference || candidate) of next-token distributions (why: mean or worst row)
    top1: float | None = None  # min fraction of positions whose argmax agrees
    lo: float | None = None  # lower bound on the figure the test computes (a ratio, a cosine, an effect size)
    hi: float | None = None  # upper bound on that figure

    def bounds(self) -> dict[str, float]:
        """The bounds this tier sets, by field name."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "why"}
        return {name: value for name, value in values.items() if value is not None}


# --- fp32 against fp32: the same function, only the summation order differs -----------------------
# ONNX graphs (tests/exporters/test_onnx_export.py) against transformers on tiny random models
ONNX_FP32_LOGITS = Tier(atol=1e-4, why=(
    "fp32 on both sides; only summation order differs (MatMul blocking, softmax, the query pre-scaled by "
    "the attention scale, GroupQueryAttention's own kernel in the fused graph). Tiny-model logits are O(1); "
    "measured 2e-6 (llama, qwen2, gemma3, both graphs) to 5e-6 (phi3, hidden 128), while a rope_theta of "
    "10000 instead of 100000 moves them by ~0.7 and Gemma3's attention scale taken as 1/sqrt(head_dim) by ~0.5."))
ONNX_FP32_DECODE = Tier(atol=1e-4, why=(
    "the same math split into prefill + one-token decodes over the cache; measured ~2e-6. A wrong cache "
    "position is a rope-sized error (ONNX_FP32_LOGITS: ~0.7), not measured separately."))
ONNX_FP32_EMBEDDED = Tier(atol=5e-3, top1=1.0, why=(
    "the embedded model (SmolLM2-135M): 30 layers, logits O(10); fp32 rounding grows with depth; measured "
    "max |diff| 7.4e-5. A wrong rope_theta (10000 vs 100000) drops top-1 agreement to 0.955 "
    "(docs/architecture.md, facts); every position's argmax must agree with transformers."))
# two runtimes (or two paths of one runtime) feeding one ONNX file through the same CPU kernels
SAME_GRAPH_SAME_KERNELS = Tier(atol=1e-5, why=(
    "one exported graph, the same inputs (ids, mask, positions, cache) through the same onnxruntime CPU kernels "
    "with the same thread count: onnxruntime-genai against onnxruntime, prefill and one-token decodes over "
    "genai's own KV cache (measured 0.0 on both graph kinds), and onnxruntime's shared-KV-buffer path against "
    "the plain path that copies the cache through present outputs (only where the cache lives differs). The "
    "bound leaves room for a kernel choosing another reduction order; a wrong position, mask or cache entry "
    "moves these tiny-model logits by O(0.1-1)."))
GENAI_INCREMENTAL_LOGITS = Tier(atol=1e-4, why=(
    "a prompt's logits fed one token at a time (genai's all-logits fallback) against one batched run: "
    "matrix-vector instead of matrix kernels, attention over a growing cache, so the summation order differs; "
    "logits here are O(10), measured up to 2e-5."))
# merge (tests/toolchain/test_merge.py)
MERGED_VS_ADAPTER = Tier(atol=1e-4, why=(
    "merged weights W + scale * B @ A in fp32 against the PEFT model computing x @ W + scale * (x @ A) @ B: "
    "reassociation only (tiny model, logits O(1)); a lost or doubled scale or a skipped module is an error "
    "the size of the adapter's whole effect (ADAPTER_EFFECT)."))
ADAPTER_EFFECT = Tier(lo=1e-2, why=(
    "a random LoRA adapter with non-zero B (init_lora_weights=False) must move the merged model's logits by "
    "far more than rounding noise (MERGED_VS_ADAPTER's 1e-4), so the merge comparison is not a model against "
    "itself; the value of the bound is not recorded beyond that, kept as found."))
# merged vs unmerged per adapter kind (tests/toolchain/test_lora_options.py, test_tied.py)
LORA_MERGE = Tier(rtol=1e-4, kl=1e-10, why=(
    "lora, DoRA and rsLoRA merged in fp32 against the unmerged PeftModel on the tiny tied llama (rank 4, B drawn "
    "N(0, 0.5), DoRA magnitudes * (1 + 0.3 N(0,1))): rtol bounds max |Δlogit| / max |logit|, measured 2e-7 (dora) "
    "to 8.6e-6 (rslora), 1.4e-5 with another draw; kl the mean KL, measured 1.3e-15 to 3.2e-14. One tier for the three kinds: the same fp32 "
    "reassociation (DoRA adds one division by a row norm). A doubled delta or a scale of alpha / r for rsLoRA is "
    "off by the adapter's effect (MERGE_ADAPTER_EFFECT)."))
MERGE_ADAPTER_EFFECT = Tier(lo=0.05, why=(
    "those adapters must move the merged model's logits away from the base's by far more than LORA_MERGE's "
    "rounding: max |Δlogit| / max |logit| measured 1.09 (lora), 0.54 (dora), 1.13 (rslora), mean KL 0.009-0.027, so a merge check that "
    "compared a model with itself, or dropped the adapter, fails."))

# --- ONNX precisions (tests/exporters/test_onnx_precisions.py) -------------------------------------
# int4/int8 block codecs against numpy and against transformers on the same dequantised weights
ONNX_NBITS_KERNEL = Tier(atol=1e-4, why=(
    "the MatMulNBits kernel against numpy on the same dequantised matrix, float32 compute (accuracy_level 1): "
    "summation order only. A wrong nibble order, scale layout or zero point moves each weight by about a "
    "quantisation step (max|w| / 7 at 4 bits), O(1) on these outputs (not measured)."))
ONNX_DEQUANT_LOGITS = Tier(atol=2e-4, why=(
    "exported int4/int8 graph against transformers with each linear weight replaced by its dequantised copy, "
    "float32 compute (accuracy_level 1); the tiny model's logits are O(1); measured ~2e-6 for the float graph. "
    "This exactness, not a loose closeness to the float model, is what catches a wrong nibble order, scale "
    "layout or zero point (an O(1) change)."))
ONNX_FP16_LOGITS = Tier(atol=3e-2, why=(
    "fp16 weights and activations against float32 transformers: ~3 significant digits on O(1) logits through "
    "2 layers; measured ~5e-3. A wrong rope or mask is an O(0.5-1) error as in fp32 (ONNX_FP32_LOGITS)."))
ONNX_INT8_DYNAMIC_LOGITS = Tier(atol=0.3, why=(
    "int8 with activations quantised at run time (accuracy_level 4) against float32 transformers on O(1) "
    "logits: measured ~0.09 (3x margin). The exact layout checks are ONNX_DEQUANT_LOGITS'; this one bounds "
    "the quantisation noise."))
ONNX_INT8_STATIC_LOGITS = Tier(atol=0.6, why=(
    "static int8 against float32 transformers: per-tensor activation ranges from 4 short random calibration "
    "sequences, coarser than run-time ranges (ONNX_INT8_DYNAMIC_LOGITS); measurement not recorded, value kept "
    "as found."))
INT8_PER_TOKEN_KERNEL = Tier(rtol=1e-5, atol=1e-4, why=(
    "the integer int8 kernel (the browser's q8, per-token activation scales) against a numpy emulation of the "
    "same rounding: the int8 products are exact in both, so only the float32 rescaling (x_scale * w_scale, "
    "applied in another order) differs, float32 rounding (rtol 1e-5 is ~100 ulp) of outputs up to O(1000) "
    "beside the 100x outlier token; atol covers outputs near zero. Not measured (onnxruntime's int8 GEMM "
    "saturates on AVX2 CPUs without VNNI, a known failure); values kept as found. A per-tensor instead of "
    "per-token scale errs on ordinary tokens by tens of percent (INT8_PER_TOKEN_OUTLIER)."))
INT8_PER_TOKEN_OUTLIER = Tier(hi=0.03, why=(
    "max |int8 - float| / max |float| per ordinary token beside a 100x outlier token: weights and activations "
    "at int8 (step 1/127 of each row's range) give about 1% error; a per-tensor activation scale set by the "
    "outlier makes the ordinary tokens' step 100x coarser, tens of percent or more. Not measured; value kept "
    "as found."))
IMPORTANCE_GAIN = Tier(hi=0.95, why=(
    "importance-weighted 4-bit quantisation error / plain round-to-nearest error, both weighted by the same "
    "random importances (gamma 0.5, a few columns dominate) on weights with outlier columns: the importance "
    "search must lower the error it targets by a clear margin (at least 5%), not by noise; the margin's size "
    "is not recorded, kept as found."))

# --- GGUF writer against transformers through llama.cpp (tests/exporters/test_gguf_writer.py) -----
GGUF_F32_LOGITS = Tier(atol=1e-5, why=(
    "F32 weights and an F32 KV cache on both sides: only summation order differs. Tiny-model logits are "
    "O(0.5-1); measured 2.1e-7..2.4e-7 (with llama.cpp's default F16 KV cache, 1.8e-4, so the bound also "
    "proves the F32 cache was used). A q/k row order left in HF layout (llama.cpp's rope pairs other "
    "dimensions) or a Gemma norm without its + 1 is an O(1) change (not measured here)."))
GGUF_F32_GEMMA3_LOGITS = Tier(atol=1e-3, why=(
    "Gemma3's GELU: ggml evaluates the tanh approximation through an F16 lookup table, so the MLP carries "
    "F16 rounding; measured 2.2e-4 (text model and the multimodal model's text tower)."))
# the families whose F32 logits carry F16 rounding; every other family uses GGUF_F32_LOGITS
GGUF_F32_LOGITS_BY_FAMILY = {"gemma3": GGUF_F32_GEMMA3_LOGITS, "gemma3_mm": GGUF_F32_GEMMA3_LOGITS}
_GGUF_HALF = ("F16/BF16 weights (llama family) with llama.cpp's default F16 KV cache: every weight rounded; "
              "measured 5.1e-4 (F16), 3.4e-3 (BF16, 8 bits of mantissa), on O(1) logits.")
GGUF_HALF_LOGITS = {"F16": Tier(atol=5e-3, why=_GGUF_HALF), "BF16": Tier(atol=2e-2, why=_GGUF_HALF)}
GGUF_ARGMAX_MARGIN = Tier(lo=2.0, why=(
    "argmax must agree wherever transformers' top-2 margin exceeds this many times the logits atol (random "
    "tiny models have near-ties; gemma3_mm has a 9e-5 margin at one position)."))
GGUF_EMBEDDED_F32 = Tier(atol=1e-3, why=(
    "the embedded model: 30 layers, logits O(10-20), F32 weights and F32 KV cache: summation order only; "
    "measured 5.9e-5."))
GGUF_EMBEDDED_F16 = Tier(top1=0.98, why=(
    "the embedded model at F16 weights and llama.cpp's default F16 KV cache; measured 0.087 max |diff|, "
    "top-1 1.0; a wrong rope_theta alone gives 0.955 on the same model (ONNX_FP32_EMBEDDED)."))

# --- GGUF quantiser and importance matrix (tests/exporters/test_gguf_quantize.py) ------------------
_BPW = ("bits per weight of the decoder layers' matrices on disk / nominal bits of the main type. Exactly 1.0 "
        "for the uniform 32-block types (lower bound 0.99). Above 1 elsewhere: SmolLM2's hidden size 576 is no "
        "multiple of 256, so 256-block tensors fall back (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, IQ4_XS -> "
        "IQ4_NL, Q2_K/Q3_K -> Q4_0), and \"_M\" mixes give some tensors more bits. Measured: Q6_K 1.22, "
        "Q5_K_M 1.10, Q4_K_M 1.23, IQ4_XS 1.04, Q3_K_M 1.35, Q2_K 1.61.")
GGUF_LAYER_BPW_RATIO = {"default": Tier(lo=0.99, hi=1.3, why=_BPW),
                        "Q3_K_M": Tier(lo=0.99, hi=1.45, why=_BPW),
                        "Q2_K": Tier(lo=0.99, hi=1.75, why=_BPW)}
_FILE_BPW = ("whole-file bits per weight of the full embedded model (token_embd, 21% of the weights and tied to "
             "the output, gets Q8_0/Q6_K): measured Q4_K_M 6.27, IQ4_XS 5.43.")
GGUF_FILE_BPW = {"Q4_K_M": Tier(hi=6.6, why=_FILE_BPW), "IQ4_XS": Tier(hi=5.8, why=_FILE_BPW)}
GGUF_QUANT_KL_SANITY = Tier(kl=0.2, why=(
    "mean KL(float || quantised) of Q4_K_M and IQ4_XS over ~500 held-out tokens of the embedded model: a "
    "sanity bound so a broken comparison (wrong tokens, unnormalised logits) cannot pass."))
GGUF_IMATRIX_KL_RATIO = Tier(hi=1.05, why=(
    "KL(float || quantised) with the imatrix may exceed the one without by this factor before the test fails: "
    "on a 135M model over ~500 held-out tokens run-to-run noise is nil (deterministic), but a 2k-token "
    "calibration can be neutral on a given text; a real regression is far larger."))
IMATRIX_ROUNDTRIP = Tier(rtol=1e-6, why=(
    "float32 rounding between the computed imatrix and the one read back from its file (GGUF and the legacy "
    ".dat format); a wrong entry order or count scaling is off by O(1) relative."))
IMATRIX_VS_LLAMA_CPP = Tier(hi=5e-3, why=(
    "torch's Linear inputs vs llama.cpp's own MUL_MAT inputs (fp32 both, different kernels and summation order "
    "through 30 layers): max |difference| / the entry's largest mean x^2. Measured 7e-4 worst (attn_output), "
    "median 4e-5; a tensor given another's activations differs by O(1)."))

# --- llama.cpp runtime (tests/runtimes/test_llamacpp_runtime.py) -----------------------------------
LLAMACPP_BATCH_VS_SINGLE = Tier(atol=2.5, kl=1e-2, why=(
    "llama.cpp computes a position's logits with different kernels in a batch and one token at a time (F16 "
    "accumulation in attention): on the embedded model they differ by up to ~1.5 of a ~60 logit range, KL "
    "~2e-4 on average (kl bounds the worst row), same argmax. The bounds leave headroom over what was measured."))
LLAMACPP_ZERO_ADAPTER = Tier(atol=1e-3, why=(
    "llama.cpp with a LoRA adapter that adds nothing (B = 0, or lora_scale 0) against no adapter, on the "
    "embedded model's ~60-range logits: measured 0.0 (1 thread); the 1e-3 margin's reason is not recorded, "
    "kept as found. A real delta (LLAMACPP_ADAPTER_EFFECT) moves them by ~24."))
LLAMACPP_RESCALED_ADAPTER = Tier(atol=1e-2, why=(
    "scale = lora_scale * alpha / rank: an adapter with doubled alpha run at half lora_scale against the same "
    "adapter at scale 1: the same scale, measured 0.0 (1 thread); the 1e-2 margin's reason is not recorded, "
    "kept as found. A scale ignored or applied twice changes logits by the adapter's effect (~24)."))
LLAMACPP_ADAPTER_EFFECT = Tier(lo=0.5, why=(
    "a random rank-4 adapter (B scale 0.5) on every layer's attn_q must change the logits, so the zero and "
    "rescaled checks do not compare a model with itself: measured 24.2 max |diff|; value kept as found."))

# --- WebLLM weights and the NumPy reference (tests/exporters/test_webllm_weights.py, _bundle.py) ---
WEBLLM_REFERENCE_EXACT = Tier(atol=1e-4, why=(
    "reference vs transformers on weights that round-trip exactly (q0f32) or on a torch model given the very "
    "values the MLC files decode to (\"mirrored\"): both sides fp32, only summation order differs; tiny-model "
    "logits are O(1), measured ~1e-6. This is the layout check that never depends on argmax margins."))
WEBLLM_REFERENCE_Q0F16 = Tier(atol=0.15, why=(
    "q0f16 vs the fp32 model: every weight rounded to float16 (relative 2^-11); measured max 3e-3 on the "
    "untied models' O(1) logits and 3e-2 on the tied model's O(10) ones (its unit-scale embedding is also its "
    "head); 5x margin."))
WEBLLM_REFERENCE_Q4 = Tier(kl=0.1, top1=0.3, why=(
    "4-bit symmetric groups of 32 on unit-scale random weights vs the fp32 model: measured mean KL 0.0007-0.028 "
    "and top-1 0.5-1.0 (tiny random models have small margins between the top two tokens). With the nibbles "
    "of each word reversed the untied models give KL 0.6 and top-1 0.04-0.08; the mirrored comparison "
    "(WEBLLM_REFERENCE_EXACT) is the layout check that never depends on margins."))
WEBLLM_BUNDLE_Q0F32_KL = Tier(kl=1e-6, why=(
    "the bundle's own reference check of the q0f32 files: the float32 copy is the merged model itself, only "
    "summation order differs (mean KL ~0 up to rounding; not measured here); a swapped or misread tensor is "
    "no rounding-size change (reversed q4 nibbles alone give KL 0.6, WEBLLM_REFERENCE_Q4)."))

# --- WebLLM model library on the CPU (tests/exporters/test_webllm_library.py) ----------------------
WEBLLM_LIB_Q0F32 = Tier(atol=1e-4, why=(
    "float32 on both sides, only the summation order differs (TVM's CPU kernels, the paged attention's online "
    "softmax); logits are O(3); measured 1.7e-6 (llama) and 1.3e-6 (qwen2). A rope_theta of 10000 instead of "
    "100000 moves them by ~0.5, a lost norm by more. Also batch_prefill/batch_decode against prefill/decode."))
WEBLLM_LIB_Q4_VS_REFERENCE = Tier(atol=1e-4, why=(
    "q4f32_1 against the NumPy reference reading the same quantised files: the same dequantised weights, so "
    "again only float32 summation order; a nibble or scale misread moves logits by O(1)."))
WEBLLM_LIB_Q4_VS_TORCH_COSINE = Tier(lo=0.8, why=(
    "q4f32_1 against the float torch model: 4-bit weights (7 levels per sign, one scale per 32 inputs) move "
    "these O(3) tiny logits by up to ~1.1 (measured); rows stay aligned in direction: measured cosine 0.937 "
    "(llama) / 0.948 (qwen2) at worst, a wrong layout gives ~0."))
WEBLLM_LIB_F16_VS_REFERENCE = Tier(atol=0.05, why=(
    "float16 quantisations against the NumPy reference (which rounds to float16 only where the weights are "
    "stored): the library's float16 activations and accumulations round at every step (eps 1e-3 on O(3) "
    "logits); measured 0.016 (llama q0f16) and 0.007 (qwen2 q4f16_1)."))
WEBLLM_SOFTMAX = Tier(rtol=1e-5, atol=1e-7, why=(
    "the library's softmax_with_temperature against numpy's on 256 float32 logits: exp and the sum in another "
    "order, a few float32 ulps relative (rtol); atol for probabilities near zero. A temperature ignored "
    "(1 instead of 0.7) changes probabilities by tens of percent. Not measured; values kept as found."))
WEBLLM_PENALTY = Tier(rtol=1e-6, why=(
    "apply_penalty_inplace against numpy: one subtraction and a multiply or divide per penalised logit in "
    "float32, possibly fused or reordered, so an ulp or two (~1e-7 relative); presence and frequency swapped, "
    "or repetition applied the wrong way, moves a logit by >= 0.25. Not measured; value kept as found."))

# --- browser runtimes against native ones -----------------------------------------------------------
BROWSER_VS_NATIVE_LOGITS = Tier(atol=1e-4, why=(
    "last-position and all-position logits of the tiny model (|logit| < ~5) in float32 compute (the q4 file "
    "too: accuracy_level 0 dequantises): onnxruntime-web's wasm and WebGPU kernels sum in another order than "
    "native MLAS, measured up to 2e-6; a wrong mask, rotary or cache is off by ~1."))
WEBLLM_GREEDY_MATCH = Tier(lo=1.0, why=(
    "fraction of prompts whose greedy ids from web-llm in chromium equal torch's: exactly all on q0f32 (same "
    "float32 math, other summation order: a flip needs a near-tie, which the tiny model's fixed prompts do not "
    "have); q4f32_1 is compared with the torch model whose weights went through the same int4 round trip, so "
    "also exactly."))
WEBLLM_BROWSER_Q0F32_LOGITS = Tier(atol=1e-3, why=(
    "q0f32 logits of the spread model (unit-scale weights, |logit| up to ~30) from web-llm's decode path on "
    "SwiftShader against torch on the CPU: float32 with another summation order; a wrong rotary, mask or KV "
    "cache is off by whole units."))
WEBGPU_AXPY = Tier(atol=1e-6, why=(
    "y = 2x + y in float32 on the GPU: exact in IEEE arithmetic, but a shader compiler may fuse the "
    "multiply-add (one rounding instead of two), which moves the result by at most 1 ulp (~1e-7 relative for "
    "|values| < 10); a wrong kernel, argument order or layout is off by O(1)."))
BUNDLE_SIZE_MB = Tier(atol=1e-6, why=(
    "the native runtime's artifact size (per-file sizes in MiB, summed) against the test's byte sum / 2**20 "
    "over the same files: float rounding only (~1e-15 MiB); 1e-6 MiB is about one byte, so a file left out "
    "or counted twice (kilobytes at least) fails."))

# --- the quickstart, end to end (tests/e2e/test_quickstart.py) -------------------------------------
QUICKSTART_METRIC_GAIN = Tier(lo=0.3, why=(
    "task metric after - before the fine-tune: the base model answers chattily (exact match ~0-10%); 30 LoRA "
    "steps reach ~90%+ here."))
QUICKSTART_ONNX_FP32 = Tier(kl=1e-4, top1=0.999, why=(
    "fp32 ONNX computes the same function as the merged fp32 model: top-1 must agree everywhere and the mean "
    "next-token KL between two fp32 implementations is rounding noise only."))
QUICKSTART_GGUF_F16 = Tier(kl=1e-4, top1=0.99, why=(
    "F16 GGUF in llama.cpp vs the merged fp32 model: fp16 weight rounding only, measured mean KL 4e-6 and "
    "top-1 0.996-1.0; greedy output matched fully in most runs but flipped once at a near-tie (match 0.75), so "
    "the check is on the logits. A wrong tensor or rope layout moves KL by whole units."))
QUICKSTART_LORA_VS_MERGED = Tier(kl=5e-3, why=(
    "base F16 GGUF + adapter GGUF applied by llama.cpp vs the merged F16 GGUF: same function up to fp16 "
    "rounding of the merged weights and llama.cpp's batched-vs-single kernels (mean KL ~2e-4)."))
QUICKSTART_LORA_BASE_FACTOR = Tier(lo=10.0, why=(
    "KL(merged || base without adapter) / KL(merged || base + adapter): the adapter is what makes them agree; "
    "the factor's size is not recorded, kept as found."))
_Q8_BROWSER = ("q8 in the browser vs native on the same file (activation rounding flips): measured mean KL 0.0410 "
               "vs 0.0425 and 0.0424 vs 0.0451, top-1 86.3% vs 86.7% and 89.8% vs 87.5%; a broken page (wrong "
               "cache, mask or dtype) moves KL by whole units and top-1 by tens of points.")
Q8_BROWSER_VS_NATIVE_KL = Tier(atol=0.01, why="|browser - native| of the mean KL. " + _Q8_BROWSER)
Q8_BROWSER_VS_NATIVE_TOP1 = Tier(atol=0.05, why="|browser - native| of the top-1 agreement. " + _Q8_BROWSER)

# --- training (tests/toolchain/test_train.py) -------------------------------------------------------
TRAINING_EVAL_LOSS = Tier(rtol=1e-3, lo=0.05, why=(
    "the tiny model's eval losses after seeded CPU training on 1 thread (8 steps, eval every 2): measured "
    "5.98247, 5.87328, 5.85979, 5.86074, identical across runs; rtol covers a different BLAS summation order. "
    "lo: the least the last eval loss must sit below the first (measured 0.122); a run that stops learning "
    "(frozen adapter, labels all -100, learning rate lost) stays near 5.98."))

# --- padding-free packing (tests/toolchain/test_packing.py) -----------------------------------------
PACKED_VS_UNPACKED_LOGITS = Tier(atol=1e-4, rtol=1e-4, why=(
    "fp32 logits of an example inside a packed row (block-diagonal mask from restarting position ids) "
    "against the example run alone, tiny random Llama, sdpa and eager: only the summation order differs "
    "(measured max |diff| 1.8e-7 sdpa, 0 eager); one token attending across examples moves them by > 1e-2 "
    "(the naive-packing control in the test)."))
PACKED_LEAK_EFFECT = Tier(lo=1e-2, why=(
    "the least max |logit change| that shows an effect in the packing test: the changed example's own logits "
    "and, in the control, a later example's logits when positions do not restart (attention leaks across "
    "examples); measured 1.60 (own) and 0.49 (leak) on sdpa and eager, against 1.8e-7 for summation-order noise."))
PACKED_VS_UNPACKED_LOSS = Tier(atol=1e-5, rtol=1e-5, why=(
    "the token-weighted mean loss (and its gradient) of a packed row and of the same examples padded, against "
    "the model's own per-example losses weighted by their label tokens, fp32: summation order only XX; a wrong normaliser (per-example mean, a pad or boundary token counted) is off by > 1e-2."))
PACKED_VS_PADDED_TRAINING = Tier(atol=3e-4, why=(
    "logged train losses and the eval loss of the harness trained 3 seeded steps (lr 1e-4) with data.packing on "
    "and off (same examples per step). Adam's first steps divide each gradient coordinate by its own size, so "
    "summation-order noise (~6e-8) in coordinates that are near zero (LoRA A's gradients while B = 0) becomes "
    "a step of ~lr: measured max |diff| 9e-5 at lr 1e-4 and 1e-3 at lr 1e-3, scaling with lr; padded to a fixed "
    "width it matched packing bit for bit, so the layout, not the maths, differs. Consecutive steps' losses "
    "differ by > 0.02, so a step that saw other examples is caught."))

# --- int8 integer kernel saturation (tests/exporters/test_onnx_precisions.py) -----------------------
INT8_WORST_CASE_LINEAR = Tier(rtol=1e-6, why=(
    "one int8 integer linear with every activation and weight at the top of its range (exactly representable "
    "in the 7-bit weight / per-token activation grid): native onnxruntime must return x @ w.T up to float "
    "rounding of the two rescales (~1e-7 relative); with the former 8-bit weights an AVX2 CPU without VNNI "
    "saturates the int16 pair sums and is off by tens of percent"))

# --- training on several processes (tests/toolchain/test_distributed.py) ----------------------------
DDP_ADAPTER_ADAMW = Tier(atol=2e-5, why=(
    "the LoRA adapter after 3 AdamW steps (lr 1e-2) of 2 gloo ranks at batch 4 against 1 process at batch 8, "
    "same examples per step, same initial adapter: only the summation order differs (each rank pads to its "
    "own longest example, the all-reduce adds two half-batch gradients); Adam's division by sqrt(v) "
    "magnifies that rounding in small gradient entries. Measured max |diff| 1.65e-6 on weights up to ~0.5 "
    "(lora_B up to 0.03). Adam is nearly blind to the gradient's scale, so DDP_ADAPTER_SGD checks that."))
DDP_ADAPTER_SGD = Tier(atol=2e-6, why=(
    "the same comparison with plain SGD (lr 2, no clipping), where the update is proportional to the "
    "gradient: measured max |diff| 1.3e-7. A loss not scaled back up for DDP's gradient average (half the "
    "gradient on 2 ranks) gives 0.30."))
DDP_ADAPTER_SGD_EFFECT = Tier(lo=0.05, why=(
    "max |lora_B| of the single-process SGD adapter (it starts at 0): the update must be large against "
    "DDP_ADAPTER_SGD's bound for a wrong gradient scale to show; measured 0.26."))

# --- half fine-tuning (tests/toolchain/test_hft.py) --------------------------------------------------
HFT_MERGED_RELOAD = Tier(atol=1e-6, why=(
    "hft's merged model is the trained full model saved again (float32, or cast to merge.dtype): its logits "
    "reloaded against the trained model's (cast the same way), fp32 compute, same process and kernels, tiny "
    "random Llama: the same weights, so measured 0.0; a lost or untied LM head, or a frozen/trained mix-up, "
    "moves these logits by O(0.1)."))

# --- QLoRA merge (tests/toolchain/test_qlora.py) -----------------------------------------------------
QLORA_DEQUANTIZED_MERGE = Tier(kl=1e-9, top1=1.0, rtol=1e-5, why=(
    "the QLoRA merge into dequant(quant(W)) against the model as trained (4-bit base + unmerged adapter, float32 "
    "compute). bitsandbytes' CPU training path dequantises the weight and runs a dense float32 matmul (its eval-mode "
    "bfloat16 fused kernel on AVX512-BF16 CPUs is switched off by load_4bit; with it KL was 8e-4) (measured: its "
    "Linear4bit output equals x @ dequantize_4bit(W4).T exactly, and re-quantising W gives the same codes), so "
    "only summation order differs: measured mean KL 8e-16 to 1.1e-13, top-1 1.0, max |Δlogit| / max |logit| "
    "2.3e-7 to 3.4e-7 on tiny tied Llamas (default and unit-scale weights, LoRA and DoRA). rtol is that last "
    "ratio's bound. Merging into the original W instead measures KL 3.5e-5 (default init) to 1.7e-3 (unit scale)."))
QLORA_ORIGINAL_MERGE_EFFECT = Tier(lo=1e-4, why=(
    "the least mean KL(as trained || merge into the original W) that shows the 4-bit rounding the adapter was "
    "trained on: measured 1.5e-3 (LoRA) and 1.7e-3 (DoRA) on the unit-scale tiny tied Llama after 4 steps, "
    "against 3e-14 to 1.1e-13 for the dequantised merge: a merge that silently used the original weights "
    "for both candidates (or the dequantised ones) sits 9 orders of magnitude away."))

# --- pruning (tests/toolchain/test_pruning.py) ------------------------------------------------------
PRUNE_INVARIANT_LOGITS = Tier(atol=1e-5, why=(
    "fp32 logits (|logit| up to ~25, unit-scale tiny llama/qwen2/mistral/qwen3) before and after cutting a "
    "structure that contributes exactly zero: an identity block (zero o_proj and down_proj), MLP channels with "
    "zero down_proj columns, a GQA group with zero o_proj columns. Only the narrower matmuls' summation order "
    "can differ; measured 0.0 in all 12 cases. Cutting live structures instead moves them by 10-25 "
    "(PRUNE_CUT_EFFECT), and slicing up rows with other indices than gate rows and down columns moved them by 31."))
PRUNE_CUT_EFFECT = Tier(lo=1.0, why=(
    "the least max |logit change| that shows a cut removed something live (the controls beside the invariance "
    "tests): measured 23.6-25.0 for dropping a live block, 9.9-11.2 for cutting 32 of 128 live MLP channels, "
    "19.1-24.4 for removing one of two live GQA groups, against 0.0 for the dead ones."))
PRUNE_RELOAD_LOGITS = Tier(atol=1e-6, why=(
    "fp32 logits of a pruned model and of its save_pretrained / from_pretrained copy, same process and kernels: "
    "the same weights, so measured 0.0; a config size that disagrees with a tensor fails to load, and a head_dim "
    "recomputed as hidden_size / heads gives other shapes or, with matching shapes, other logits by whole units."))
PRUNE_CACHED_DECODE = Tier(atol=1e-4, why=(
    "logits of greedy generation over the KV cache (4 steps) against full forwards over the same tokens, pruned "
    "tiny models, fp32 (|logit| up to ~15): SDPA over a one-token query against the whole causal matrix, measured "
    "9.5e-6 to 1.3e-5. With the survivors' layer_idx left unrenumbered a block reads another block's cache slot "
    "and the test fails."))
PRUNE_IDENTITY_ANGLE = Tier(hi=1e-6, why=(
    "the mean angular distance arccos(cos)/pi of a block that is exactly the identity (zero o_proj and "
    "down_proj): cos is 1 up to float64 rounding (~1e-16), and arccos near 1 turns that into ~1e-8 / pi; "
    "measured 1.0e-9 to 1.8e-9, while the live blocks of the same models measure 0.157 to 0.172."))
PRUNE_ANGLE_BY_HAND = Tier(atol=1e-9, why=(
    "the library's per-block mean angular distance (hooks, float64) against the test's own from "
    "output_hidden_states and cosine_similarity on the same fp32 hidden states: float64 rounding only, measured "
    "8e-17 on block distances of 0.228 and 0.201. (With unit RMSNorm weights the normed input points the same "
    "way as the raw one, so this bound does not tell those two apart; it catches a block paired with another's "
    "output, off by the blocks' own distances.)"))
PRUNE_SUMSQ_BY_HAND = Tier(rtol=1e-9, why=(
    "per-column sums of squared q_proj inputs from the calibration hooks against the test's own sums over "
    "input_layernorm(embeddings), float64 accumulation of the same fp32 activations: measured 0.0 relative; a "
    "missed sequence (one of two) is off by about half, and sums of x rather than x^2 by more."))
PRUNE_WANDA_BY_HAND = Tier(rtol=1e-12, why=(
    "Wanda scores |W| x column norm in float64 against products written out by hand (and against |W| x "
    "sqrt(sum_sq) for a model's module): one multiplication each, measured 0.0; sum_sq used without the square root changes the "
    "hand example's scores by factors of 0.5 to 3 (column norms 2, 1, 3, 0.5 against sums 4, 1, 9, 0.25)."))
