// Drive a browser bundle headless: node web/driver.mjs JOB.json (one-shot), or
// node web/driver.mjs --session (one page kept loaded across many calls: see "session mode" below).
//
// JOB.json: {"bundle": dir, "device": "wasm"|"webgpu", "dtype": "fp32"|..., "steps": [{op, args}],
//            "timeout_s": N, "model_id"?: id (default: bundle.json's), "threads"?: wasm threads,
//            "log_level"?: onnxruntime-web log level ('verbose' .. 'fatal')}
//
// Serves the bundle on 127.0.0.1 (random free port; Range requests, wasm MIME type, cross-origin
// isolation so onnxruntime-web can use wasm threads), opens its index.html?driver in Debian's
// chromium through playwright-core, calls window.edgesmith.load({device, dtype, ...}) and then each
// step as window.edgesmith[op](...args), and prints ONE JSON line on stdout:
//   {"ok": true, "load": {...}, "steps": [{"op", "result", "ms"}], "crossOriginIsolated", "blocked_requests",
//    "http_errors", "console" (errors and warnings)}
// On failure it still prints the line (ok false, error, failed_step) and exits 1. Any request to a
// host other than the bundle's is blocked and fails the job: a bundle must be self-contained.
// Both modes share the server, the chromium launch (fresh profile, same flags) and the page setup.
import { createReadStream, rmSync } from 'node:fs';
import { createRequire } from 'node:module';
import { mkdtemp, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { createInterface } from 'node:readline';
import { extname, join, resolve, sep } from 'node:path';
import { fileURLToPath } from 'node:url';

const MIME = {
  '.html': 'text/html; charset=utf-8', '.js': 'text/javascript', '.mjs': 'text/javascript',
  '.json': 'application/json', '.wasm': 'application/wasm', '.css': 'text/css',
  '.onnx': 'application/octet-stream', '.onnx_data': 'application/octet-stream', '.txt': 'text/plain',
  '.bin': 'application/octet-stream', // WebLLM bundles: params_shard_*.bin
};
const ISOLATION = {
  'Cross-Origin-Opener-Policy': 'same-origin',
  'Cross-Origin-Embedder-Policy': 'require-corp',
  'Cross-Origin-Resource-Policy': 'same-origin',
};
// Debian's chromium. --enable-unsafe-webgpu exposes WebGPU on Linux; with no GPU, Chromium falls back
// to SwiftShader's software adapter (playwright already passes --enable-unsafe-swiftshader). No GL
// or Vulkan backend is forced, so a machine with a GPU benchmarks its GPU. ForceEagerMeasureMemory:
// performance.measureUserAgentSpecificMemory() (bench's memory) answers at once (~30 ms) instead of at
// the next natural GC (15 s in headless chromium).
const CHROMIUM_ARGS = [
  '--no-sandbox', '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--no-first-run', '--enable-unsafe-webgpu', '--enable-unsafe-swiftshader',
  '--enable-blink-features=ForceEagerMeasureMemory',
];

/** playwright-core: from $EDGESMITH_NODE_MODULES when set (edgesmith's user cache: this script may be
 * installed apart from its npm packages), else resolved beside this script (a clone's web/node_modules). */
export async function loadPlaywright() {
  const modules = process.env.EDGESMITH_NODE_MODULES;
  if (!modules) return import('playwright-core');
  return createRequire(join(resolve(modules), '..', 'resolve-from-here.js'))('playwright-core');
}

/** playwright-core launch options: Debian's chromium (or $CHROMIUM), headless, never a downloaded build. */
export const chromiumOptions = () => ({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium', headless: true, args: CHROMIUM_ARGS,
});

/** Parse a Range header against a file size: [start, end] inclusive, null (whole file), or 'bad'. */
export function parseRange(header, size) {
  if (!header) return null;
  const m = /^bytes=(\d*)-(\d*)$/.exec(header.trim());
  if (!m || (m[1] === '' && m[2] === '')) return 'bad';
  let start, end;
  if (m[1] === '') { // suffix: the last N bytes
    start = Math.max(0, size - Number(m[2]));
    end = size - 1;
  } else {
    start = Number(m[1]);
    end = m[2] === '' ? size - 1 : Math.min(Number(m[2]), size - 1);
  }
  return start > end || start >= size ? 'bad' : [start, end];
}

/** Serve `root` on 127.0.0.1 at a free port ({plain: true}: without isolation headers or Range
 * support, like a bare static server). Resolves to {server, origin}. */
export async function serveBundle(root, { plain = false } = {}) {
  root = resolve(root);
  // plain: what a bare static server sends (no isolation headers, no Range): the page must still work
  const server = createServer(async (req, res) => {
    const headers = plain ? { 'Cache-Control': 'no-store' } : { ...ISOLATION, 'Cache-Control': 'no-store', 'Accept-Ranges': 'bytes' };
    if (plain) delete req.headers.range;
    try {
      const path = decodeURIComponent(new URL(req.url, 'http://x').pathname);
      let file = resolve(root, '.' + (path.endsWith('/') ? path + 'index.html' : path));
      if (file !== root && !file.startsWith(root + sep)) throw Object.assign(new Error('outside'), { code: 'ENOENT' });
      const info = await stat(file);
      if (info.isDirectory()) file = join(file, 'index.html');
      const size = (await stat(file)).size;
      headers['Content-Type'] = MIME[extname(file)] ?? 'application/octet-stream';
      const range = parseRange(req.headers.range, size);
      if (range === 'bad') {
        res.writeHead(416, { ...headers, 'Content-Range': `bytes */${size}` }).end();
        return;
      }
      const [start, end] = range ?? [0, size - 1];
      if (range) headers['Content-Range'] = `bytes ${start}-${end}/${size}`;
      headers['Content-Length'] = size === 0 ? 0 : end - start + 1;
      res.writeHead(range ? 206 : 200, headers);
      if (req.method === 'HEAD' || size === 0) res.end();
      else createReadStream(file, { start, end }).pipe(res);
    } catch (e) {
      const status = e.code === 'ENOENT' || e.code === 'ENOTDIR' ? 404 : 500;
      res.writeHead(status, { ...headers, 'Content-Type': 'text/plain' }).end(`${status} ${req.url}\n`);
    }
  });
  await new Promise((ok, fail) => server.once('error', fail).listen(0, '127.0.0.1', ok));
  return { server, origin: `http://127.0.0.1:${server.address().port}` };
}

// Problems with the fields a job and a session header share.
function settingsProblems(job) {
  if (!job || typeof job !== 'object' || Array.isArray(job)) return [`must be a JSON object, got ${JSON.stringify(job)}`];
  const problems = [];
  if (typeof job.bundle !== 'string') problems.push('`bundle` must be a folder path');
  if (!['wasm', 'webgpu'].includes(job.device)) problems.push(`\`device\` must be "wasm" or "webgpu", got ${JSON.stringify(job.device)}`);
  if (job.timeout_s !== undefined && !(job.timeout_s > 0)) problems.push(`\`timeout_s\` must be a positive number, got ${job.timeout_s}`);
  const lo = job.load_options;
  if (lo !== undefined && (lo === null || typeof lo !== 'object' || Array.isArray(lo))) {
    problems.push(`\`load_options\` must be a JSON object (extra fields for the page's load()), got ${JSON.stringify(lo)}`);
  }
  return problems;
}

function readJob(job) {
  const problems = settingsProblems(job);
  if (!Array.isArray(job?.steps ?? [])) problems.push('`steps` must be a list of {op, args}');
  for (const [i, s] of (Array.isArray(job?.steps) ? job.steps : []).entries()) {
    if (typeof s?.op !== 'string' || !Array.isArray(s.args ?? [])) problems.push(`steps[${i}] must be {op: string, args: list}`);
  }
  if (problems.length) throw new Error(`bad job: ${problems.join('; ')}`);
  return { steps: [], timeout_s: 600, ...job };
}

function readHeader(header) {
  const problems = settingsProblems(header);
  if (header && typeof header === 'object' && 'steps' in header) problems.push('a session header takes no `steps`: send each call as its own line');
  if (problems.length) throw new Error(`bad session header: ${problems.join('; ')}`);
  return { timeout_s: 600, ...header };
}

const firstLine = (e) => (e?.message ?? String(e)).split('\n')[0].replace(/^page\.evaluate: (Error: )?/, '');
const sleep = (ms) => new Promise((ok) => setTimeout(ok, ms));

class Timeout extends Error {}

/** `promise`, or a Timeout rejection ("timed out after N s (during <what()>)") once `seconds` pass. */
function withTimeout(promise, seconds, what) {
  let timer;
  const deadline = new Promise((_, fail) => {
    timer = setTimeout(() => fail(new Timeout(`timed out after ${seconds} s (during ${what()})`)), seconds * 1000);
  });
  promise.catch(() => {}); // after a timeout, its late rejection is expected
  return Promise.race([promise, deadline]).finally(() => clearTimeout(timer));
}

/**
 * A bundle served on 127.0.0.1 and open in a fresh headless chromium (own profile, requests to any
 * other host blocked and recorded): what a one-shot job and a session share. `step` names what is
 * under way, for error messages. close() may come at any time, even while open() is still launching.
 */
class BundlePage {
  constructor(job, { keepConsole = 'first', echoConsole = false } = {}) {
    this.job = job;
    this.step = 'launch';
    this.blocked = [];
    this.httpErrors = [];
    this.console = [];
    this.consoleSeen = 0;
    this.keepConsole = keepConsole; // 'first': the first messages (a job); 'last': a rolling window (a session)
    this.echoConsole = echoConsole; // also write each kept message to stderr
    this.crossOriginIsolated = null;
    this.closed = false;
    this.gone = false;
  }

  async open() {
    try {
      const { chromium } = await loadPlaywright();
      ({ server: this.server, origin: this.origin } = await serveBundle(this.job.bundle));
      this.profile = await mkdtemp(join(tmpdir(), 'edgesmith-chromium-'));
      removeAtExit(this.profile);
      // a fresh profile each time; playwright refuses --user-data-dir in args, hence a persistent context
      this.context = await chromium.launchPersistentContext(this.profile, chromiumOptions());
      if (this.closed) throw new Error('closed while launching'); // the deadline passed meanwhile
      this.context.on('close', () => { this.gone = true; });
      await this.context.route('**/*', (route) => this.route(route));
      this.page = this.context.pages()[0] ?? await this.context.newPage();
      this.watch(this.page);
      this.step = 'open page';
      await this.page.goto(`${this.origin}/index.html?driver`); // waits for the load event: module scripts have run
      await this.page.waitForFunction(() => window.edgesmith, null, { timeout: 10_000 }).catch(() => {
        const why = [...this.httpErrors, ...this.console].slice(0, 5).join('; ') || 'no error reported';
        throw new Error(`window.edgesmith never appeared: the page script did not load (${why})`);
      });
      this.crossOriginIsolated = await this.page.evaluate(() => self.crossOriginIsolated);
    } catch (e) {
      if (this.closed) await this.release(); // what open() acquired after close() ran
      throw e;
    }
  }

  route(route) {
    const url = route.request().url();
    if (url.startsWith(this.origin + '/')) return route.continue();
    this.blocked.push(url);
    return route.abort('blockedbyclient');
  }

  watch(page) {
    const { log_level } = this.job;
    page.on('console', (m) => {
      if (log_level || ['error', 'warning'].includes(m.type())) this.note(`${m.type()}: ${m.text()}`); // everything when debugging
    });
    page.on('pageerror', (e) => this.note(`pageerror: ${e.message}`));
    page.on('crash', () => { this.gone = true; });
    page.on('close', () => { this.gone = true; });
    page.on('response', (r) => {
      if (r.status() >= 400) this.httpErrors.push(`${r.status()} ${r.url().slice(this.origin.length)}`);
    });
  }

  note(line) {
    const cap = this.job.log_level ? 5000 : 50;
    this.consoleSeen++;
    if (this.echoConsole) process.stderr.write(`page ${line}\n`);
    if (this.keepConsole === 'first' && this.console.length >= cap) return;
    this.console.push(line);
    if (this.console.length > cap) this.console.shift();
  }

  /** Console messages noted since `seen` was this.consoleSeen, at most the last `n`. */
  consoleSince(seen, n = 20) {
    const fresh = Math.min(this.consoleSeen - seen, this.console.length, n);
    return fresh > 0 ? this.console.slice(-fresh) : [];
  }

  /** window.edgesmith[op](...args) in the page; resolves to its (JSON-able) result. */
  call(op, args = []) {
    return this.page.evaluate(([o, a]) => {
      const api = window.edgesmith;
      if (typeof api[o] !== 'function') throw new Error(`unknown op ${o}; known: ${Object.keys(api).join(', ')}`);
      return api[o](...a);
    }, [op, args]);
  }

  load() {
    this.step = 'load';
    const { device, dtype, model_id, threads, log_level, wasm_build, load_options } = this.job;
    return this.call('load', [{ ...load_options, device, dtype, model_id, threads, log_level, wasm_build }]);
  }

  /** Throws if the page requested a non-local URL since blocked.length was `since`. */
  checkSelfContained(since = 0) {
    const urls = this.blocked.slice(since);
    if (urls.length) throw new Error(`the page requested ${urls.length} non-local URL(s): ${urls.slice(0, 3).join(', ')}`);
  }

  /** False once the page or the browser is gone (a crash): nothing more can run in it. */
  alive() {
    return !this.gone;
  }

  async close() {
    this.closed = true;
    await this.release();
  }

  // Close whatever exists; a browser that does not close in 10 s is killed by playwright at exit.
  async release() {
    const { context, server, profile } = this;
    this.context = this.server = this.profile = null;
    if (context) await Promise.race([context.close().catch(() => {}), sleep(10_000)]);
    if (server) {
      server.closeAllConnections?.();
      await new Promise((ok) => server.close(ok));
    }
    if (profile) {
      await rm(profile, { recursive: true, force: true }).catch(() => {});
      exitRemovals.delete(profile);
    }
  }
}

// Profiles still on disk when the process exits (a signal, process.exit mid-close) go then, synchronously.
const exitRemovals = new Set();
let exitHook = false;
function removeAtExit(dir) {
  if (!exitHook) process.once('exit', () => exitRemovals.forEach((d) => rmSync(d, { recursive: true, force: true })));
  exitHook = true;
  exitRemovals.add(dir);
}

/** Run a job (an object) and resolve to the result object; never leaves the browser or server running. */
export async function runJob(job) {
  job = readJob(job);
  const bp = new BundlePage(job);
  const out = {
    ok: false, load: null, steps: [], crossOriginIsolated: null, blocked_requests: bp.blocked, http_errors: bp.httpErrors,
    console: bp.console,
  };
  try {
    const work = async () => {
      await bp.open();
      out.crossOriginIsolated = bp.crossOriginIsolated;
      out.load = await bp.load();
      for (const [i, { op, args = [] }] of job.steps.entries()) {
        bp.step = `steps[${i}] ${op}`;
        const t0 = performance.now();
        const result = await bp.call(op, args);
        out.steps.push({ op, result, ms: performance.now() - t0 });
      }
      bp.step = 'self-containment check';
      bp.checkSelfContained();
    };
    await withTimeout(work(), job.timeout_s, () => bp.step);
    out.ok = true;
  } catch (e) {
    out.error = firstLine(e);
    out.failed_step = bp.step;
  } finally {
    await bp.close();
  }
  return out;
}

// ---------------------------------------------------------------------------- session mode
// node driver.mjs --session: JSON lines on stdin, one JSON reply line per line on stdout.
//   header  {bundle, device, dtype?, model_id?, threads?, timeout_s? (per call, default 600), log_level?,
//            wasm_build? ('plain' (default on wasm) | 'jsep'), load_options? (object: more fields for
//            the page's load(), e.g. a WebLLM bundle's {chat_opts, cache_backend})}
//           A WebLLM bundle (exporters/webllm: index.html + app-config.json) is driven the same way
//           with device "webgpu": its page has the same load/info/greedy/bench/logitsAll/encode/chatIds
//           ops over @mlc-ai/web-llm's engine, plus chat and decode.
//        -> {"ok": true, "load", "crossOriginIsolated", "info"}
//           | {"ok": false, "error", "failed_step", "console", "http_errors"} and exit 1
//   call    {op, args?: list, save?: path}
//        -> {"ok": true, "result", "ms"} | {"ok": false, "error", "console" (recent errors/warnings)}
//           with save: the result's b64 field is written to `save` (via save.tmp + rename) and the
//           result comes back without it, plus {saved: path, bytes: n}
//   {"op": "close"} or EOF: close the browser and server, remove the profile, exit 0. A call past
//   timeout_s, or a crashed page, replies ok:false and then the driver exits 1 (the page state is
//   unknown). stdout carries only these lines; logging goes to stderr.

const reply = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');

/** Decode a result's b64 field into `path` (atomically) and return the result without it. */
async function saveB64(result, path, op) {
  if (typeof result?.b64 !== 'string') {
    throw new Error(`"save" given but ${op} returned no b64 string to save; drop "save" or call an op that returns {b64}`);
  }
  const { b64, ...rest } = result;
  const bytes = Buffer.from(b64, 'base64');
  await writeFile(`${path}.tmp`, bytes);
  await rename(`${path}.tmp`, path);
  return { ...rest, saved: path, bytes: bytes.length };
}

function parseCall(line) {
  let call;
  try {
    call = JSON.parse(line);
  } catch (e) {
    throw new Error(`bad call line (not JSON: ${e.message}); send {"op": str, "args": list, "save"?: path}`);
  }
  const problems = [];
  if (typeof call?.op !== 'string') problems.push('`op` must be a string');
  if (!Array.isArray(call?.args ?? [])) problems.push('`args` must be a list');
  if (call?.save !== undefined && typeof call.save !== 'string') problems.push('`save` must be a file path');
  if (problems.length) throw new Error(`bad call ${line.slice(0, 200)}: ${problems.join('; ')}`);
  return { args: [], ...call };
}

/** One parsed call -> {reply, fatal} (fatal: the session cannot go on). */
async function sessionCall(bp, call, timeout_s) {
  const seen = bp.consoleSeen;
  const blocked = bp.blocked.length;
  const { op } = call;
  try {
    const t0 = performance.now();
    let result = await withTimeout(bp.call(op, call.args), timeout_s, () => op);
    const ms = performance.now() - t0;
    bp.checkSelfContained(blocked);
    if (call.save !== undefined) result = await saveB64(result, call.save, op);
    return { reply: { ok: true, result, ms } };
  } catch (e) {
    const fatal = e instanceof Timeout || !bp.alive();
    const error = fatal && !(e instanceof Timeout) ? `${firstLine(e)} (the page or browser is gone)` : firstLine(e);
    return { reply: { ok: false, error, console: bp.consoleSince(seen) }, fatal };
  }
}

/** Start the page for a header line; replies with the header's line. Resolves to the page or null. */
async function sessionStart(bp, header) {
  try {
    await withTimeout((async () => {
      await bp.open();
      const load = await bp.load();
      bp.step = 'info';
      const info = await bp.call('info', []);
      bp.step = 'self-containment check';
      bp.checkSelfContained();
      reply({ ok: true, load, crossOriginIsolated: bp.crossOriginIsolated, info });
    })(), header.timeout_s, () => bp.step);
    return bp;
  } catch (e) {
    reply({ ok: false, error: firstLine(e), failed_step: bp.step, console: bp.consoleSince(0), http_errors: bp.httpErrors });
    return null;
  }
}

async function session() {
  console.log = console.error; // stdout carries the JSON lines only
  const lines = createInterface({ input: process.stdin, crlfDelay: Infinity })[Symbol.asyncIterator]();
  let bp = null, stopping = null;
  const stop = (code) => {
    stopping ??= (bp?.close() ?? Promise.resolve()).then(() => process.exit(code));
    return stopping;
  };
  // a dead parent: stdin may stay open (inherited elsewhere) or a call may be running, so also watch
  // for being re-parented; never leave chromium running behind a parent that is gone
  const parent = process.ppid;
  setInterval(() => { if (process.ppid !== parent) stop(1); }, 1000).unref();
  process.stdout.on('error', () => stop(1)); // EPIPE: nobody reads the replies
  for (const signal of ['SIGTERM', 'SIGINT', 'SIGHUP']) process.once(signal, () => stop(1));

  const first = await lines.next();
  if (first.done) {
    reply({ ok: false, error: 'no session header on stdin: send {"bundle", "device", ...} as the first line', failed_step: 'header' });
    return stop(1);
  }
  let header;
  try {
    header = readHeader(JSON.parse(first.value));
  } catch (e) {
    reply({ ok: false, error: e instanceof SyntaxError ? `bad session header (not JSON: ${e.message})` : e.message, failed_step: 'header' });
    return stop(1); // stdin may still be open
  }
  bp = new BundlePage(header, { keepConsole: 'last', echoConsole: !!header.log_level });
  if (!await sessionStart(bp, header)) return stop(1);
  for (let next = await lines.next(); !next.done; next = await lines.next()) {
    const line = next.value.trim();
    if (!line) continue;
    let call;
    try {
      call = parseCall(line);
    } catch (e) {
      reply({ ok: false, error: e.message, console: [] });
      continue;
    }
    if (call.op === 'close') break;
    const { reply: r, fatal } = await sessionCall(bp, call, header.timeout_s);
    reply(r);
    if (fatal) return stop(1);
  }
  return stop(0);
}

// ---------------------------------------------------------------------------- one-shot mode
async function main(argv) {
  if (argv.length === 1 && argv[0] === '--session') return session();
  if (argv.length !== 1) {
    console.error('usage: node web/driver.mjs JOB.json | node web/driver.mjs --session (JSON lines on stdin)');
    return 2;
  }
  let job;
  try {
    job = JSON.parse(await readFile(argv[0], 'utf8'));
  } catch (e) {
    console.error(`driver: cannot read job ${argv[0]}: ${e.message}`);
    return 2;
  }
  let out;
  try {
    out = await runJob(job);
  } catch (e) {
    out = { ok: false, error: e.message, failed_step: 'job' };
  }
  process.stdout.write(JSON.stringify(out) + '\n');
  if (!out.ok) console.error(`driver: failed at ${out.failed_step}: ${out.error}`);
  return out.ok ? 0 : 1;
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  process.exitCode = await main(process.argv.slice(2));
}
