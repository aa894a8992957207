// edgesmith browser bundle: a chat page over transformers.js, plus a test/benchmark API on
// window.edgesmith (promises, plain JSON in and out) that web/driver.mjs drives headless.
//
// Everything is loaded from the bundle folder: ./bundle.json, ./models/<id>/..., and the
// vendored runtime (./vendor/transformers/, ./vendor/ort/). Nothing is fetched from a hub or CDN.
import {
  AutoModelForCausalLM, AutoTokenizer, Tensor, TextStreamer, env,
} from './vendor/transformers/transformers.min.js';

env.allowLocalModels = true;
env.allowRemoteModels = false;
env.localModelPath = './models/';
env.useBrowserCache = false; // the files are local already; a Cache API copy could go stale across bundle updates
// absolute: onnxruntime-web imports its .mjs glue with this prefix, relative to its own module URL
env.backends.onnx.wasm.wasmPaths = new URL('./vendor/ort/', location.href).href;

const F16_DTYPES = new Set(['fp16', 'q4f16']); // need the adapter's 'shader-f16' feature on WebGPU
const $ = (id) => document.getElementById(id);
const state = { bundle: null, model: null, tokenizer: null, eos: [], loaded: null, broken: null };

// ---------------------------------------------------------------------------- device & dtype
async function probeWebGPU() {
  if (!navigator.gpu) return { ok: false, reason: 'navigator.gpu is undefined' };
  let adapter;
  try {
    adapter = await navigator.gpu.requestAdapter({ powerPreference: 'high-performance' });
  } catch (e) {
    return { ok: false, reason: `requestAdapter threw: ${e.message}` };
  }
  if (!adapter) return { ok: false, reason: 'navigator.gpu.requestAdapter() returned null' };
  const i = adapter.info ?? {};
  return {
    ok: true,
    shader_f16: adapter.features.has('shader-f16'),
    info: { vendor: i.vendor, architecture: i.architecture, device: i.device, description: i.description },
  };
}

// bundle.json's dtypes.<device> is one dtype or a preference list; f16 dtypes are only picked on
// an adapter with shader-f16, because a failed session poisons every later inference in the page.
function pickDtype(device, gpu) {
  const wanted = state.bundle.dtypes?.[device] ?? 'fp32';
  const prefs = Array.isArray(wanted) ? wanted : [wanted];
  const usable = prefs.filter((d) => device !== 'webgpu' || gpu?.shader_f16 || !F16_DTYPES.has(d));
  if (!usable.length) {
    throw new Error(`bundle.json dtypes.${device} ${JSON.stringify(wanted)} all need shader-f16, which this `
      + 'adapter lacks: the bundle must list an fp32/q4 fallback');
  }
  return usable[0];
}

async function bundle() {
  if (!state.bundle) {
    const r = await fetch('./bundle.json');
    if (!r.ok) throw new Error(`./bundle.json: HTTP ${r.status}`);
    state.bundle = await r.json();
  }
  return state.bundle;
}

// ---------------------------------------------------------------------------- tensors & runs
const idsTensor = (ids) => new Tensor('int64', BigInt64Array.from(ids, BigInt), [1, ids.length]);
const onesMask = (n) => new Tensor('int64', new BigInt64Array(n).fill(1n), [1, n]);

// float16 bits (a Uint16Array: onnxruntime-web's float16 data where the browser lacks Float16Array) -> float32.
function halfBitsToFloat32(bits) {
  const out = new Float32Array(bits.length);
  for (let i = 0; i < bits.length; i++) {
    const h = bits[i];
    const sign = h & 0x8000 ? -1 : 1;
    const exp = (h >> 10) & 0x1f;
    const frac = h & 0x3ff;
    if (exp === 0) out[i] = sign * frac * 2 ** -24; // zero and subnormals
    else if (exp === 31) out[i] = frac ? NaN : sign * Infinity;
    else out[i] = sign * (1 + frac / 1024) * 2 ** (exp - 15);
  }
  return out;
}

// A float tensor's data (or its [start, end) slice) as float32: fp16 graphs return float16 logits,
// as a Float16Array where the browser has one, else as raw bits in a Uint16Array.
function float32Data(t, start = 0, end = t.data.length) {
  const data = t.data.subarray(start, end);
  if (t.type === 'float32') return data;
  if (t.type !== 'float16') throw new Error(`logits of type ${t.type}: expected float32 or float16`);
  return data instanceof Uint16Array ? halfBitsToFloat32(data) : Float32Array.from(data);
}

const lastRow = (logits) => float32Data(logits, logits.data.length - logits.dims.at(-1));

function argmax(row) {
  let best = 0;
  for (let i = 1; i < row.length; i++) if (row[i] > row[best]) best = i;
  return best;
}

const argmaxLast = (logits) => argmax(lastRow(logits));

// Bytes as base64: String.fromCharCode over 32 KiB chunks (argument-count limit), then btoa.
function base64(bytes) {
  const chunks = [];
  for (let i = 0; i < bytes.length; i += 0x8000) chunks.push(String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000)));
  return btoa(chunks.join(''));
}

// A bad ids argument would reach onnxruntime and poison the page (see guarded): refuse it first.
function checkIds(ids, op) {
  if (!Array.isArray(ids) || !ids.length || !ids.every(Number.isInteger)) {
    throw new Error(`${op}: ids must be a non-empty list of integer token ids, got ${JSON.stringify(ids)?.slice(0, 80)}`);
  }
}

function disposePast(past) {
  for (const t of Object.values(past ?? {})) if (t.location === 'gpu-buffer') t.dispose();
}

// One forward pass of `ids` on top of `past` (null: empty cache). Returns the logits and the new
// cache; transformers.js frees the previous GPU cache buffers in getPastKeyValues.
async function forward(ids, past, pastLen) {
  const out = await state.model.forward({
    input_ids: idsTensor(ids), attention_mask: onesMask(pastLen + ids.length), past_key_values: past,
  });
  return { logits: out.logits, past: state.model.getPastKeyValues(out, past) };
}

// onnxruntime-web throws a bare number (a pointer to a C++ exception whose text it does not
// export) when a kernel refuses a node at session creation, e.g. MatMulNBits with bits=8 or
// GatherBlockQuantized in 1.22: name the usual causes instead of a meaningless number.
function errorText(e) {
  if (typeof e === 'number') {
    return `onnxruntime-web aborted with a raw wasm exception (${e}): an operator or attribute this build `
      + 'does not support (seen: MatMulNBits bits=8, GatherBlockQuantized); run the graph in native '
      + 'onnxruntime to check it is valid';
  }
  return e?.message ?? String(e);
}

// Every inference goes through here: after one failure transformers.js/onnxruntime-web fail every
// later run in the page, so refuse clearly instead of reporting a misleading second error.
async function guarded(fn) {
  if (state.broken) throw new Error(`an earlier inference failed (${state.broken}); reload the page`);
  if (!state.model) throw new Error('no model loaded: call load() first');
  try {
    return await fn();
  } catch (e) {
    state.broken = errorText(e);
    throw new Error(state.broken);
  }
}

// ---------------------------------------------------------------------------- the API
// onnxruntime-web ships two wasm builds. The JSEP one (WebGPU/WebNN kernels) is built with
// asyncify so its kernels can await the GPU, which also slows every CPU kernel; without a GPU the
// plain build runs the same CPU kernels faster (SmolLM2-135M q8 decode, medians of 3 rounds: 17.0 vs 13.6 tok/s).
const WASM_BUILDS = {
  plain: { mjs: './vendor/ort/ort-wasm-simd-threaded.mjs', wasm: './vendor/ort/ort-wasm-simd-threaded.wasm' },
  jsep: { mjs: './vendor/ort/ort-wasm-simd-threaded.jsep.mjs', wasm: './vendor/ort/ort-wasm-simd-threaded.jsep.wasm' },
};

async function load({ device, dtype, model_id, threads, log_level, wasm_build } = {}) {
  if (state.model) throw new Error('a model is already loaded in this page; reload to load another');
  if (state.broken) throw new Error(`an earlier load failed (${state.broken}); reload the page`);
  const b = await bundle();
  const gpu = await probeWebGPU();
  device ??= gpu.ok ? 'webgpu' : 'wasm';
  if (device === 'webgpu' && !gpu.ok) throw new Error(`WebGPU unavailable: ${gpu.reason}`);
  if (device === 'webgpu' && F16_DTYPES.has(dtype) && !gpu.shader_f16) {
    throw new Error(`dtype ${dtype} needs shader-f16, which this WebGPU adapter lacks`);
  }
  dtype ??= pickDtype(device, gpu);
  // before the first session is created: one wasm module per page
  wasm_build ??= device === 'wasm' ? 'plain' : 'jsep';
  if (!WASM_BUILDS[wasm_build] || (device !== 'wasm' && wasm_build !== 'jsep')) {
    throw new Error(`wasm_build ${JSON.stringify(wasm_build)}: 'plain' or 'jsep' on wasm, 'jsep' on ${device}`);
  }
  const build = WASM_BUILDS[wasm_build];
  env.backends.onnx.wasm.wasmPaths = { mjs: new URL(build.mjs, location.href).href, wasm: new URL(build.wasm, location.href).href };
  if (threads) env.backends.onnx.wasm.numThreads = threads;
  if (log_level) env.backends.onnx.logLevel = log_level; // 'verbose' shows onnxruntime's node placement
  const id = model_id ?? b.model_id;
  const t0 = performance.now();
  try {
    state.tokenizer = await AutoTokenizer.from_pretrained(id);
    state.model = await AutoModelForCausalLM.from_pretrained(id, { device, dtype });
  } catch (e) {
    state.broken = errorText(e);
    throw new Error(state.broken);
  }
  const load_ms = performance.now() - t0;
  const eos = state.model.generation_config?.eos_token_id ?? state.model.config.eos_token_id;
  state.eos = eos == null ? [] : [eos].flat();
  state.loaded = {
    load_ms, device, dtype, model_id: id,
    adapter_info: gpu.ok ? { ...gpu.info, shader_f16: gpu.shader_f16 } : null,
    threads: env.backends.onnx.wasm.numThreads ?? null,
    wasm_build,
    crossOriginIsolated: self.crossOriginIsolated,
    eos_token_id: state.eos,
  };
  showLoaded();
  return state.loaded;
}

function tokenizer() {
  if (!state.tokenizer) throw new Error('no model loaded: call load() first');
  return state.tokenizer;
}

const encode = async (text) => Array.from(tokenizer().encode(text, { add_special_tokens: false }));

async function chatIds(messages) {
  const ids = tokenizer().apply_chat_template(messages, { add_generation_prompt: true, tokenize: true, return_tensor: false });
  return Array.from(ids, Number);
}

// The manual greedy loop (bench, and greedy with stop ids): one forward over the prompt, then
// single-token forwards with the KV cache, each feeding the argmax, like runtimes/base.py's
// generate. Stops after n tokens, or after a token in `stop` (included). Returns the tokens and the
// times the first and the last token were chosen.
async function greedyLoop(ids, n, stop = null) {
  let { logits: l, past } = await forward(ids, null, 0);
  try {
    const tokens = [argmaxLast(l)];
    const t_first = performance.now();
    while (tokens.length < n && !stop?.has(tokens.at(-1))) {
      ({ logits: l, past } = await forward([tokens.at(-1)], past, ids.length + tokens.length - 1));
      tokens.push(argmaxLast(l));
    }
    return { tokens, t_first, t_last: performance.now() };
  } finally {
    disposePast(past);
  }
}

// Greedy decoding of max_new_tokens from ids, like the Python runtimes' generate(ids, n, stop_ids).
// Without stop ids: model.generate (the chat UI's own path) with EOS stopping switched off, so
// exactly max_new_tokens come back. With stop ids: the manual loop, which stops after emitting one
// (included). (model.generate would also apply generation_config.json's processors, e.g. a
// repetition_penalty, which the Python runtimes do not.)
const greedy = async (ids, max_new_tokens, stop_ids = null) => {
  checkIds(ids, 'greedy');
  if (!(max_new_tokens > 0)) return [];
  return guarded(async () => {
    if (stop_ids?.length) return (await greedyLoop(ids, max_new_tokens, new Set(stop_ids.map(Number)))).tokens;
    const out = await state.model.generate({
      input_ids: idsTensor(ids), attention_mask: onesMask(ids.length),
      max_new_tokens, do_sample: false, eos_token_id: null,
    });
    return out.tolist()[0].slice(ids.length).map(Number);
  });
};

// Logits of the last position, as a list of numbers.
const logits = async (ids) => {
  checkIds(ids, 'logits');
  return guarded(async () => {
    const { logits: l, past } = await forward(ids, null, 0);
    disposePast(past);
    return Array.from(lastRow(l));
  });
};

// The largest logitsAll answer: its base64 must fit in one JS string (V8: < 2**29 characters) in the
// page and again in the driver. Longer inputs go in slices.
const MAX_LOGITS_BYTES = 256 * 2 ** 20;

// Logits of every position of one forward over ids (empty cache): {b64, shape: [ids.length, vocab],
// dtype: 'float32'}, b64 = the rows as little-endian float32 (every browser platform is little-endian).
// Only the forward goes through guarded: a failed encoding does not break the page.
const logitsAll = async (ids) => {
  checkIds(ids, 'logitsAll');
  const vocab = state.model?.config?.vocab_size;
  if (vocab && ids.length * vocab * 4 > MAX_LOGITS_BYTES) {
    throw new Error(`logitsAll: ${ids.length} positions x ${vocab} logits x 4 bytes is over the ${MAX_LOGITS_BYTES / 2 ** 20} MiB `
      + `one answer can carry; ask for at most ${Math.floor(MAX_LOGITS_BYTES / (vocab * 4))} ids at a time`);
  }
  const l = await guarded(async () => {
    const { logits: out, past } = await forward(ids, null, 0);
    disposePast(past);
    return out;
  });
  if (l.dims.length !== 3 || l.dims[1] !== ids.length) {
    throw new Error(`logitsAll: the graph returned logits of shape [${l.dims}], not [1, ${ids.length}, vocab]: `
      + 'it must output every position\'s logits');
  }
  const rows = float32Data(l);
  return { b64: base64(new Uint8Array(rows.buffer, rows.byteOffset, rows.byteLength)), shape: [ids.length, l.dims[2]], dtype: 'float32' };
};

// performance.measureUserAgentSpecificMemory(): the page's JS + wasm memory as the browser accounts
// it (not GPU buffers); only in a cross-origin-isolated page. Chromium answers at its next GC
// (15 s in headless chromium) unless ForceEagerMeasureMemory is on (the driver turns it on: ~30 ms),
// so it races a timeout. {bytes, ms}, or {bytes: null, reason, ms}.
async function uaMemory(timeout_ms = 20_000) {
  const t0 = performance.now();
  const done = (r) => ({ ...r, ms: performance.now() - t0 });
  if (typeof performance.measureUserAgentSpecificMemory !== 'function') {
    return done({ bytes: null, reason: 'performance.measureUserAgentSpecificMemory is not available in this browser' });
  }
  if (!self.crossOriginIsolated) return done({ bytes: null, reason: 'the page is not cross-origin isolated (COOP/COEP headers)' });
  let timer;
  try {
    const timeout = new Promise((ok) => { timer = setTimeout(() => ok(null), timeout_ms); });
    const m = await Promise.race([performance.measureUserAgentSpecificMemory(), timeout]);
    return done(m ? { bytes: m.bytes } : { bytes: null, reason: `no answer within ${timeout_ms / 1000} s` });
  } catch (e) {
    return done({ bytes: null, reason: `measureUserAgentSpecificMemory failed: ${e.message}` });
  } finally {
    clearTimeout(timer);
  }
}

// Benchmark, llama-bench style and matching runtimes/base.py's bench: a manual greedy loop over
// model.forward with the KV cache (not model.generate) so that prefill and decode are timed
// apart. prefill = one forward over the whole prompt, until its logits are on the CPU and the
// first token is chosen (= time to first token: ids are given, tokenisation is excluded);
// decode = gen_tokens - 1 single-token forwards, each feeding the argmax (never stopping at EOS,
// so every run decodes the same count). The first repetition's tokens come back for a check.
const bench = (ids, gen_tokens = 64, repetitions = 3, warmup = 1) => guarded(async () => {
  const run = async (n) => {
    const t0 = performance.now();
    const { tokens, t_first, t_last } = await greedyLoop(ids, n);
    return { prefill_ms: t_first - t0, decode_ms: t_last - t_first, tokens };
  };
  for (let i = 0; i < warmup; i++) await run(Math.min(gen_tokens, 8));
  const r = { ttft_ms: [], prefill_tps: [], decode_tps: [], tokens: null };
  for (let i = 0; i < repetitions; i++) {
    const { prefill_ms, decode_ms, tokens } = await run(gen_tokens);
    r.ttft_ms.push(prefill_ms);
    r.prefill_tps.push(ids.length / (prefill_ms / 1000));
    if (gen_tokens > 1) r.decode_tps.push((gen_tokens - 1) / (decode_ms / 1000));
    r.tokens ??= tokens;
  }
  const m = performance.memory;
  r.memory = m ? { usedJSHeapSize: m.usedJSHeapSize, totalJSHeapSize: m.totalJSHeapSize, jsHeapSizeLimit: m.jsHeapSizeLimit } : null;
  r.ua_memory = await uaMemory();
  r.settings = { prompt_tokens: ids.length, gen_tokens, repetitions, warmup, ...state.loaded };
  return r;
});

const info = async () => ({
  crossOriginIsolated: self.crossOriginIsolated, webgpu: await probeWebGPU(), userAgent: navigator.userAgent,
  transformers_version: env.version, loaded: state.loaded,
});

window.edgesmith = { load, encode, chatIds, greedy, logits, logitsAll, bench, info };

// ---------------------------------------------------------------------------- chat UI
const history = [];

function showLoaded() {
  const l = state.loaded;
  $('status').textContent = `${l.model_id} on ${l.device} (${l.dtype}), loaded in ${(l.load_ms / 1000).toFixed(1)} s`
    + (l.adapter_info ? ` — ${l.adapter_info.vendor} ${l.adapter_info.architecture}` : '');
  $('send').disabled = false;
}

function bubble(role, text) {
  const div = document.createElement('div');
  div.className = `msg ${role}`;
  div.textContent = text;
  $('log').append(div);
  div.scrollIntoView();
  return div;
}

async function send(event) {
  event.preventDefault();
  const text = $('prompt').value.trim();
  if (!text || !state.model) return;
  $('prompt').value = '';
  $('send').disabled = true;
  history.push({ role: 'user', content: text });
  bubble('user', text);
  const out = bubble('assistant', '');
  let t0, tFirst, count = 0;
  const streamer = new TextStreamer(state.tokenizer, {
    skip_prompt: true,
    skip_special_tokens: true,
    callback_function: (piece) => { out.textContent += piece; },
    token_callback_function: () => {
      count++;
      tFirst ??= performance.now();
      const decode_s = (performance.now() - tFirst) / 1000;
      $('stats').textContent = `first token ${(tFirst - t0).toFixed(0)} ms`
        + (count > 1 ? ` · ${((count - 1) / decode_s).toFixed(1)} tok/s` : '');
    },
  });
  try {
    const inputs = state.tokenizer.apply_chat_template(history, { add_generation_prompt: true, return_dict: true });
    t0 = performance.now();
    const seq = await guarded(() => state.model.generate({
      ...inputs, streamer, do_sample: false,
      max_new_tokens: state.bundle.max_new_tokens ?? 256, eos_token_id: state.eos,
    }));
    const reply = state.tokenizer.decode(seq.tolist()[0].slice(inputs.input_ids.dims.at(-1)), { skip_special_tokens: true });
    history.push({ role: 'assistant', content: reply });
    out.textContent = reply;
  } catch (e) {
    out.textContent = `error: ${e.message}`;
    out.classList.add('error');
  } finally {
    $('send').disabled = !!state.broken;
  }
}

$('form').addEventListener('submit', send);
// the driver loads with explicit settings; a person gets the best device right away
if (!new URLSearchParams(location.search).has('driver')) {
  bundle().then(() => load()).catch((e) => { $('status').textContent = `failed to load: ${e.message}`; });
}
