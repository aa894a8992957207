// edgesmith WebLLM bundle: a chat page over @mlc-ai/web-llm's own engine (MLCEngine), plus a
// test/benchmark API on window.edgesmith (promises, plain JSON in and out) that web/driver.mjs drives.
//
// Everything comes from the bundle folder: ./app-config.json (web-llm AppConfig), ./models/<id>/
// (mlc-chat-config.json, tokenizer.json, tensor-cache.json, params_shard_*.bin), ./libs/<id>.wasm and
// the vendored engine ./vendor/web-llm/index.js. No hub, no CDN.
//
// web-llm 0.2.86 facts this page works around (see exporters/webllm/vendor.py):
// - ModelRecord.model must be absolute, and web-llm appends "resolve/main/" to it unless it has a
//   "/resolve/<x>/" part: the page resolves models/<id>/ against location.href and appends
//   "resolve/../", which web-llm's own new URL(...) normalises back to models/<id>/.
// - config, tokenizer and weights go through the artifact cache keyed by URL: when the bundle's
//   files change, the model's cache entries are deleted before loading (cacheKey below).
// - the engine exposes no logits: a LogitProcessor sees each step's logits; it is attached to the
//   pipeline only while logits() runs (a processor copies every step's logits to the CPU).
import * as webllm from './vendor/web-llm/index.js';

const $ = (id) => document.getElementById(id);
// Sampling for every driver call: temperature 0 is greedy in web-llm (softmax at 1e-6, top-1 kept);
// the penalties must be set too: forwardTokensAndSample range-checks the chat config's values.
const GREEDY = { temperature: 0, top_p: 1, repetition_penalty: 1, frequency_penalty: 0, presence_penalty: 0 };
const F16_FEATURE = 'shader-f16';
const state = { appConfig: null, engine: null, loaded: null, broken: null, processor: null };

// ---------------------------------------------------------------------------- bundle & device
async function appConfig() {
  if (!state.appConfig) {
    const r = await fetch('./app-config.json', { cache: 'no-store' });
    if (!r.ok) throw new Error(`./app-config.json: HTTP ${r.status} (the bundle must carry web-llm's AppConfig)`);
    const raw = await r.json();
    if (!Array.isArray(raw?.model_list) || !raw.model_list.length) {
      throw new Error('./app-config.json: model_list must be a non-empty list of ModelRecords');
    }
    state.appConfig = { ...raw, model_list: raw.model_list.map(absoluteRecord) };
  }
  return state.appConfig;
}

// A bundle-relative ModelRecord made loadable by web-llm (see the top of the file).
function absoluteRecord(rec) {
  let model = new URL(rec.model, location.href).href;
  if (!model.endsWith('/')) model += '/';
  if (!/\/resolve\/[^/]+\//.test(model)) model += 'resolve/../';
  // model_lib stays as written: relative -> fetched against the page, never cached (never stale)
  return { ...rec, model };
}

const modelFolder = (rec) => new URL('.', new URL(rec.model)).href; // "…/resolve/../" normalised

function record(model_id) {
  const list = state.appConfig.model_list;
  const rec = model_id ? list.find((r) => r.model_id === model_id) : list[0];
  if (!rec) throw new Error(`model_id ${JSON.stringify(model_id)} is not in app-config.json; it has: ${list.map((r) => r.model_id).join(', ')}`);
  return rec;
}

async function probeWebGPU() {
  if (!navigator.gpu) return { ok: false, reason: 'navigator.gpu is undefined (WebGPU is off in this browser or context)' };
  let adapter;
  try {
    adapter = await navigator.gpu.requestAdapter({ powerPreference: 'high-performance' });
  } catch (e) {
    return { ok: false, reason: `requestAdapter threw: ${e.message}` };
  }
  if (!adapter) return { ok: false, reason: 'navigator.gpu.requestAdapter() returned null (no usable GPU or software adapter)' };
  const i = adapter.info ?? {};
  return {
    ok: true,
    features: [...adapter.features].sort(),
    shader_f16: adapter.features.has(F16_FEATURE),
    limits: { maxBufferSize: adapter.limits.maxBufferSize, maxStorageBufferBindingSize: adapter.limits.maxStorageBufferBindingSize },
    info: { vendor: i.vendor, architecture: i.architecture, device: i.device, description: i.description },
  };
}

// What the adapter lacks for `rec`, as an error naming the fix, or null.
function featureProblem(rec, gpu) {
  if (!gpu.ok) {
    return `WebGPU unavailable: ${gpu.reason} (fix: a browser with WebGPU on; headless chromium needs --enable-unsafe-webgpu)`;
  }
  const missing = (rec.required_features ?? []).filter((f) => !gpu.features.includes(f));
  if (!missing.length) return null;
  const f32 = state.appConfig.model_list.filter((r) => r.model_lib && !(r.required_features ?? []).length).map((r) => r.model_id);
  return `${rec.model_id} needs the WebGPU feature(s) ${missing.join(', ')}, which this adapter `
    + `(${gpu.info.vendor} ${gpu.info.architecture}) lacks (fix: load an f32 quantisation`
    + (f32.length ? ` such as ${f32.join(', ')}` : ', e.g. q4f32_1, exported with the bundle')
    + `${missing.includes(F16_FEATURE) ? ', or use a GPU and browser with shader-f16' : ''})`;
}

// SHA-256 over the model's small index files: when it differs from the last load's, the bundle was
// rebuilt and web-llm's URL-keyed cache would serve the old files.
async function cacheKey(rec) {
  if (!crypto.subtle) return null; // not a secure context: no Cache API either
  const folder = modelFolder(rec);
  const parts = [JSON.stringify(rec)];
  for (const name of ['mlc-chat-config.json', 'tensor-cache.json']) {
    const r = await fetch(new URL(name, folder), { cache: 'no-store' });
    if (!r.ok) throw new Error(`${new URL(name, folder).pathname}: HTTP ${r.status} (the model folder is incomplete)`);
    parts.push(await r.text());
  }
  const digest = await crypto.subtle.digest('SHA-256', new TextEncoder().encode(parts.join('\n')));
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, '0')).join('');
}

async function dropStaleCache(rec, cfg) {
  const key = await cacheKey(rec);
  const slot = `edgesmith-webllm:${rec.model_id}`;
  if (key && localStorage.getItem(slot) !== key) {
    await webllm.deleteModelAllInfoInCache(rec.model_id, cfg).catch(() => {});
  }
  return () => key && localStorage.setItem(slot, key);
}

// The model library must exist and be wasm: web-llm would instantiate a 404 page and fail obscurely.
async function checkLibrary(rec) {
  if (!rec.model_lib) {
    throw new Error(`${rec.model_id} has no model library in this bundle (app-config.json: no model_lib) (fix: `
      + `load a quantisation the bundle built a library for, or re-export with that quantisation in the libraries)`);
  }
  const url = new URL(rec.model_lib, location.href);
  const r = await fetch(url, { cache: 'no-store', headers: { Range: 'bytes=0-3' } });
  const head = r.ok ? new Uint8Array(await r.arrayBuffer()).slice(0, 4) : null;
  if (!r.ok) throw new Error(`model library ${url.pathname}: HTTP ${r.status} (fix: build it with the webllm exporter's library step)`);
  if (head.length < 4 || head[0] !== 0 || head[1] !== 0x61 || head[2] !== 0x73 || head[3] !== 0x6d) {
    throw new Error(`model library ${url.pathname} is not a WebAssembly file (fix: rebuild it with the webllm exporter)`);
  }
}

// ---------------------------------------------------------------------------- engine internals
// The pipeline of the loaded model: web-llm keeps it in engine.loadedModelIdToPipeline (not public
// API; the vendored version is pinned, so its shape is known).
function pipeline() {
  const p = state.engine?.loadedModelIdToPipeline?.get(state.loaded?.model_id);
  if (!p) throw new Error('no model loaded: call load() first');
  return p;
}

async function guarded(fn) {
  if (state.broken) throw new Error(`an earlier call failed the engine (${state.broken}); reload the page`);
  if (!state.engine) throw new Error('no model loaded: call load() first');
  try {
    return await fn();
  } catch (e) {
    if (/device (was )?lost|DeviceLost/i.test(e?.message ?? '')) state.broken = e.message;
    throw e;
  }
}

function checkIds(ids, op) {
  if (!Array.isArray(ids) || !ids.length || !ids.every(Number.isInteger)) {
    throw new Error(`${op}: ids must be a non-empty list of integer token ids, got ${JSON.stringify(ids)?.slice(0, 80)}`);
  }
}

function checkRoom(n, op) {
  const ctx = state.loaded.context_window_size;
  if (ctx > 0 && n > ctx) throw new Error(`${op}: ${n} tokens exceed the context window of ${ctx} (fix: shorter prompt or fewer new tokens)`);
}

// ---------------------------------------------------------------------------- the API
async function load({ model_id, chat_opts, cache_backend } = {}) {
  if (state.engine) throw new Error('a model is already loaded in this page; reload to load another');
  const cfg = await appConfig();
  if (cache_backend) cfg.cacheBackend = cache_backend;
  const rec = record(model_id);
  const gpu = await probeWebGPU();
  const problem = featureProblem(rec, gpu);
  if (problem) throw new Error(problem);
  const remember = await dropStaleCache(rec, cfg);
  const progress = [];
  // a pass-through processor: registered so the pipeline knows it, detached until logits() needs it
  state.processor = { on: false, rows: [], processLogits(l) { if (this.on) this.rows.push(Float32Array.from(l)); return l; },
    processSampledToken() {}, resetState() {} };
  await checkLibrary(rec);
  const t0 = performance.now();
  const engine = new webllm.MLCEngine({
    appConfig: cfg, logitProcessorRegistry: new Map([[rec.model_id, state.processor]]),
    initProgressCallback: (r) => { progress.push(r.text); $('status').textContent = r.text; },
  });
  try {
    await engine.reload(rec.model_id, chat_opts === undefined ? GREEDY : chat_opts ?? undefined);
  } catch (e) {
    const where = progress.length ? `after "${progress.at(-1).slice(0, 120)}"` : 'before any progress (at the model library)';
    throw new Error(`web-llm could not load ${rec.model_id} ${where}: ${e?.message ?? e}`);
  }
  const load_ms = performance.now() - t0;
  state.engine = engine;
  remember();
  const chat = engine.loadedModelIdToChatConfig?.get(rec.model_id) ?? {};
  state.loaded = { model_id: rec.model_id, load_ms, context_window_size: chat.context_window_size ?? null };
  const p = pipeline();
  if (!('logitProcessor' in p)) throw new Error('this web-llm build has no pipeline.logitProcessor: logits() cannot work (check the vendored version)');
  p.logitProcessor = undefined;
  Object.assign(state.loaded, {
    device: 'webgpu', quant: chat.quantization ?? null, model_lib: rec.model_lib,
    required_features: rec.required_features ?? [], vram_required_MB: rec.vram_required_MB ?? null,
    adapter_info: { ...gpu.info, shader_f16: gpu.shader_f16 }, adapter_features: gpu.features,
    prefill_chunk_size: chat.prefill_chunk_size ?? null, conv_template: chat.conv_template?.name ?? null,
    stop_token_ids: p.stopTokens ?? chat.conv_template?.stop_token_ids ?? [],
    eos_token_id: chat.conv_template?.stop_token_ids ?? [],
    sampling: chat_opts === undefined ? GREEDY : chat_opts, cache_backend: webllm.getCacheBackend?.(cfg) ?? cfg.cacheBackend ?? 'cache',
    progress_last: progress.at(-1) ?? null, crossOriginIsolated: self.crossOriginIsolated,
  });
  showLoaded();
  return state.loaded;
}

const encode = async (text) => Array.from(pipeline().tokenizer.encode(text), Number);
const decode = async (ids) => pipeline().tokenizer.decode(Int32Array.from(ids));

// The prompt ids web-llm itself prefills for a conversation (its conv_template, not a jinja
// template): captured from the pipeline's getInputData during a one-token completion.
async function chatIds(messages) {
  return guarded(async () => {
    const p = pipeline();
    const original = p.getInputData;
    let ids = null;
    p.getInputData = async function (...args) {
      const out = await original.apply(this, args);
      ids = out[0].filter(Array.isArray).flat();
      return out;
    };
    try {
      await state.engine.resetChat();
      await state.engine.chat.completions.create({ messages, max_tokens: 1, ...GREEDY, stream: false });
    } finally {
      p.getInputData = original;
      await state.engine.resetChat();
    }
    if (!ids) throw new Error('chatIds: web-llm never built the prompt (getInputData was not called)');
    return ids;
  });
}

// Greedy decoding of max_new_tokens from ids through the engine's forwardTokensAndSample (prefill
// of ids, then one-token decode steps with the KV cache), stopping after a token in stop_ids
// (included), like runtimes/base.py's generate. Returns the ids and when the first/last came.
async function greedyLoop(ids, n, stop = null) {
  checkRoom(ids.length + n, 'greedy');
  const engine = state.engine;
  await engine.resetChat();
  const t0 = performance.now();
  const tokens = [await engine.forwardTokensAndSample(ids, true)];
  const t_first = performance.now();
  while (tokens.length < n && !stop?.has(tokens.at(-1))) tokens.push(await engine.forwardTokensAndSample([tokens.at(-1)], false));
  return { tokens, t0, t_first, t_last: performance.now() };
}

const greedy = async (ids, max_new_tokens, stop_ids = null) => {
  checkIds(ids, 'greedy');
  if (!(max_new_tokens > 0)) return [];
  return guarded(async () => (await greedyLoop(ids, max_new_tokens, new Set((stop_ids ?? []).map(Number)))).tokens);
};

// Bytes as base64 (32 KiB chunks: the argument-count limit of fromCharCode).
function base64(bytes) {
  const chunks = [];
  for (let i = 0; i < bytes.length; i += 0x8000) chunks.push(String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000)));
  return btoa(chunks.join(''));
}

const MAX_LOGITS_BYTES = 256 * 2 ** 20; // one answer's base64 must fit a JS string in the page and the driver

// Next-token logits after every prefix of ids: ids[0] as a one-token prefill, then each following id
// as a decode step, the LogitProcessor copying each step's logits (as the model produced them, before
// any penalty). {b64 (little-endian float32 rows), shape: [ids.length, vocab], dtype}. These are the
// engine's decode-path logits, one position at a time (web-llm has no all-positions output).
const logitsAll = async (ids) => {
  checkIds(ids, 'logitsAll');
  return guarded(async () => {
    checkRoom(ids.length, 'logitsAll');
    const p = pipeline(), engine = state.engine, proc = state.processor;
    proc.rows = [];
    proc.on = true;
    p.logitProcessor = proc;
    try {
      await engine.resetChat();
      await engine.forwardTokensAndSample([ids[0]], true);
      for (const id of ids.slice(1)) await engine.forwardTokensAndSample([id], false);
    } finally {
      proc.on = false;
      p.logitProcessor = undefined;
    }
    const vocab = proc.rows[0].length;
    if (ids.length * vocab * 4 > MAX_LOGITS_BYTES) throw new Error(`logitsAll: ${ids.length} x ${vocab} float32 is over ${MAX_LOGITS_BYTES / 2 ** 20} MiB; ask for fewer ids`);
    const out = new Float32Array(ids.length * vocab);
    proc.rows.forEach((row, i) => out.set(row, i * vocab));
    proc.rows = [];
    return { b64: base64(new Uint8Array(out.buffer)), shape: [ids.length, vocab], dtype: 'float32' };
  });
};

// Logits of the last position after a prefill over ids (the prefill path), as a list of numbers.
const logits = async (ids) => {
  checkIds(ids, 'logits');
  return guarded(async () => {
    checkRoom(ids.length, 'logits');
    const p = pipeline(), proc = state.processor;
    proc.rows = [];
    proc.on = true;
    p.logitProcessor = proc;
    try {
      await state.engine.resetChat();
      await state.engine.forwardTokensAndSample(ids, true);
    } finally {
      proc.on = false;
      p.logitProcessor = undefined;
    }
    const row = proc.rows.at(-1);
    proc.rows = [];
    return Array.from(row);
  });
};

// One chat turn through the OpenAI-style API (the UI's path): {text, ids (the reply's token ids,
// stop token excluded, read from the pipeline), finish_reason, usage (web-llm's, with
// extra.prefill_tokens_per_s / decode_tokens_per_s / time_to_first_token_s), ms}.
async function chat(messages, { max_tokens = 128, temperature = 0, ...rest } = {}) {
  return guarded(async () => {
    await state.engine.resetChat();
    const t0 = performance.now();
    const r = await state.engine.chat.completions.create({
      messages, max_tokens, ...GREEDY, temperature, ...rest, stream: false,
    });
    const ms = performance.now() - t0;
    return {
      text: r.choices[0].message.content, ids: Array.from(pipeline().outputIds ?? [], Number),
      finish_reason: r.choices[0].finish_reason, usage: r.usage, ms,
    };
  });
}

// Benchmark, llama-bench style like runtimes/base.py's bench: prefill = forwardTokensAndSample over
// the whole prompt until the first token is on the CPU (= time to first token: ids given), decode =
// gen_tokens - 1 one-token steps, never stopping at EOS. The first repetition's tokens come back.
const bench = (ids, gen_tokens = 64, repetitions = 3, warmup = 1) => {
  checkIds(ids, 'bench');
  return guarded(async () => {
    for (let i = 0; i < warmup; i++) await greedyLoop(ids, Math.min(gen_tokens, 8));
    const r = { ttft_ms: [], prefill_tps: [], decode_tps: [], tokens: null };
    for (let i = 0; i < repetitions; i++) {
      const { tokens, t0, t_first, t_last } = await greedyLoop(ids, gen_tokens);
      r.ttft_ms.push(t_first - t0);
      r.prefill_tps.push(ids.length / ((t_first - t0) / 1000));
      if (gen_tokens > 1) r.decode_tps.push((gen_tokens - 1) / ((t_last - t_first) / 1000));
      r.tokens ??= tokens;
    }
    await state.engine.resetChat();
    const m = performance.memory;
    r.memory = m ? { usedJSHeapSize: m.usedJSHeapSize, totalJSHeapSize: m.totalJSHeapSize, jsHeapSizeLimit: m.jsHeapSizeLimit } : null;
    r.settings = { prompt_tokens: ids.length, gen_tokens, repetitions, warmup, ...state.loaded };
    return r;
  });
};

const info = async () => ({
  crossOriginIsolated: self.crossOriginIsolated, secureContext: self.isSecureContext, webgpu: await probeWebGPU(),
  userAgent: navigator.userAgent, web_llm: { exports: typeof webllm.MLCEngine === 'function', cache_api: typeof caches !== 'undefined' },
  models: (await appConfig()).model_list.map((r) => ({ model_id: r.model_id, required_features: r.required_features ?? [] })),
  loaded: state.loaded,
});

window.edgesmith = { load, encode, decode, chatIds, greedy, logits, logitsAll, chat, bench, info };

// ---------------------------------------------------------------------------- chat UI
const history = [];

function showLoaded() {
  const l = state.loaded;
  $('status').textContent = `${l.model_id} on WebGPU, loaded in ${(l.load_ms / 1000).toFixed(1)} s`
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
  if (!text || !state.engine) return;
  $('prompt').value = '';
  $('send').disabled = true;
  history.push({ role: 'user', content: text });
  bubble('user', text);
  const out = bubble('assistant', '');
  const t0 = performance.now();
  let tFirst = null, count = 0;
  try {
    // the engine keeps the KV cache of earlier turns when the history matches (multi-round chat)
    const stream = await state.engine.chat.completions.create({ messages: history, stream: true, stream_options: { include_usage: true } });
    let usage = null;
    for await (const chunk of stream) {
      const piece = chunk.choices[0]?.delta?.content ?? '';
      if (piece) {
        count++;
        tFirst ??= performance.now();
        out.textContent += piece;
        const s = (performance.now() - tFirst) / 1000;
        $('stats').textContent = `first token ${(tFirst - t0).toFixed(0)} ms` + (count > 1 ? ` · ${((count - 1) / s).toFixed(1)} tok/s` : '');
      }
      usage = chunk.usage ?? usage;
    }
    if (usage?.extra) {
      $('stats').textContent = `first token ${(usage.extra.time_to_first_token_s * 1000).toFixed(0)} ms · `
        + `prefill ${usage.extra.prefill_tokens_per_s.toFixed(1)} tok/s · decode ${usage.extra.decode_tokens_per_s.toFixed(1)} tok/s`;
    }
    history.push({ role: 'assistant', content: await state.engine.getMessage() });
  } catch (e) {
    out.textContent = `error: ${e.message}`;
    out.classList.add('error');
    history.pop();
  } finally {
    $('send').disabled = !!state.broken;
  }
}

$('form').addEventListener('submit', send);

async function startUI() {
  const cfg = await appConfig();
  const gpu = await probeWebGPU();
  const select = $('model');
  for (const rec of cfg.model_list) select.append(new Option(rec.model_id, rec.model_id));
  // a person gets the first model this adapter can run, with the model's own sampling defaults
  const usable = cfg.model_list.find((r) => r.model_lib && !featureProblem(r, gpu)) ?? cfg.model_list[0];
  select.value = usable.model_id;
  select.addEventListener('change', () => { location.search = `?model=${encodeURIComponent(select.value)}`; });
  const wanted = new URLSearchParams(location.search).get('model') ?? usable.model_id;
  select.value = wanted;
  await load({ model_id: wanted, chat_opts: null });
}

// the driver loads with explicit settings; a person gets a model right away
if (!new URLSearchParams(location.search).has('driver')) {
  startUI().catch((e) => { $('status').textContent = `failed to load: ${e.message}`; });
}
