// Drive a browser bundle headless: node web/driver.mjs JOB.json
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
import { createReadStream } from 'node:fs';
import { mkdtemp, readFile, rm, stat } from 'node:fs/promises';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { extname, join, resolve, sep } from 'node:path';
import { fileURLToPath } from 'node:url';

const MIME = {
  '.html': 'text/html; charset=utf-8', '.js': 'text/javascript', '.mjs': 'text/javascript',
  '.json': 'application/json', '.wasm': 'application/wasm', '.css': 'text/css',
  '.onnx': 'application/octet-stream', '.onnx_data': 'application/octet-stream', '.txt': 'text/plain',
};
const ISOLATION = {
  'Cross-Origin-Opener-Policy': 'same-origin',
  'Cross-Origin-Embedder-Policy': 'require-corp',
  'Cross-Origin-Resource-Policy': 'same-origin',
};
// Debian's chromium. --enable-unsafe-webgpu exposes WebGPU on Linux; with no GPU, Chromium falls back
// to SwiftShader's software adapter (playwright already passes --enable-unsafe-swiftshader). No GL
// or Vulkan backend is forced, so a machine with a GPU benchmarks its GPU.
const CHROMIUM_ARGS = [
  '--no-sandbox', '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--no-first-run', '--enable-unsafe-webgpu', '--enable-unsafe-swiftshader',
];

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

/** Serve `root` on 127.0.0.1 at a free port. Resolves to {server, origin}. */
export async function serveBundle(root) {
  root = resolve(root);
  const server = createServer(async (req, res) => {
    const headers = { ...ISOLATION, 'Cache-Control': 'no-store', 'Accept-Ranges': 'bytes' };
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

function readJob(job) {
  const problems = [];
  if (typeof job.bundle !== 'string') problems.push('`bundle` must be a folder path');
  if (!['wasm', 'webgpu'].includes(job.device)) problems.push(`\`device\` must be "wasm" or "webgpu", got ${JSON.stringify(job.device)}`);
  if (!Array.isArray(job.steps ?? [])) problems.push('`steps` must be a list of {op, args}');
  for (const [i, s] of (job.steps ?? []).entries()) {
    if (typeof s?.op !== 'string' || !Array.isArray(s.args ?? [])) problems.push(`steps[${i}] must be {op: string, args: list}`);
  }
  if (job.timeout_s !== undefined && !(job.timeout_s > 0)) problems.push(`\`timeout_s\` must be a positive number, got ${job.timeout_s}`);
  if (problems.length) throw new Error(`bad job: ${problems.join('; ')}`);
  return { steps: [], timeout_s: 600, ...job };
}

/** Run a job (an object) and resolve to the result object; never leaves the browser or server running. */
export async function runJob(job) {
  job = readJob(job);
  const { chromium } = await import('playwright-core');
  const out = {
    ok: false, load: null, steps: [], crossOriginIsolated: null, blocked_requests: [], http_errors: [], console: [],
  };
  const { server, origin } = await serveBundle(job.bundle);
  const profile = await mkdtemp(join(tmpdir(), 'edgesmith-chromium-'));
  let context, timer, closing = false;
  let step = 'launch';
  try {
    const deadline = new Promise((_, fail) => {
      timer = setTimeout(() => fail(new Error(`timed out after ${job.timeout_s} s (during ${step})`)), job.timeout_s * 1000);
    });
    const work = (async () => {
      // a fresh profile per job; playwright refuses --user-data-dir in args, hence a persistent context
      context = await chromium.launchPersistentContext(profile, chromiumOptions());
      if (closing) await context.close(); // the deadline passed while launching
      await context.route('**/*', (route) => {
        const url = route.request().url();
        if (url.startsWith(origin + '/')) return route.continue();
        out.blocked_requests.push(url);
        return route.abort('blockedbyclient');
      });
      const page = context.pages()[0] ?? await context.newPage();
      page.on('console', (m) => {
        const wanted = job.log_level || ['error', 'warning'].includes(m.type()); // everything when debugging
        if (wanted && out.console.length < (job.log_level ? 5000 : 50)) out.console.push(`${m.type()}: ${m.text()}`);
      });
      page.on('pageerror', (e) => out.console.push(`pageerror: ${e.message}`));
      page.on('response', (r) => {
        if (r.status() >= 400) out.http_errors.push(`${r.status()} ${r.url().slice(origin.length)}`);
      });
      step = 'open page';
      await page.goto(`${origin}/index.html?driver`); // waits for the load event: module scripts have run
      await page.waitForFunction(() => window.edgesmith, null, { timeout: 10_000 }).catch(() => {
        const why = [...out.http_errors, ...out.console].slice(0, 5).join('; ') || 'no error reported';
        throw new Error(`window.edgesmith never appeared: the page script did not load (${why})`);
      });
      out.crossOriginIsolated = await page.evaluate(() => self.crossOriginIsolated);
      const call = (op, args) => page.evaluate(([o, a]) => {
        const api = window.edgesmith;
        if (typeof api[o] !== 'function') throw new Error(`unknown op ${o}; known: ${Object.keys(api).join(', ')}`);
        return api[o](...a);
      }, [op, args]);
      step = 'load';
      const loadArgs = { device: job.device, dtype: job.dtype, model_id: job.model_id, threads: job.threads, log_level: job.log_level };
      out.load = await call('load', [loadArgs]);
      for (const [i, { op, args = [] }] of job.steps.entries()) {
        step = `steps[${i}] ${op}`;
        const t0 = performance.now();
        const result = await call(op, args);
        out.steps.push({ op, result, ms: performance.now() - t0 });
      }
      if (out.blocked_requests.length) {
        step = 'self-containment check';
        throw new Error(`the page requested ${out.blocked_requests.length} non-local URL(s): ${out.blocked_requests.slice(0, 3).join(', ')}`);
      }
    })();
    work.catch(() => {}); // after a timeout, its late rejection is expected
    await Promise.race([work, deadline]);
    out.ok = true;
  } catch (e) {
    out.error = (e.message ?? String(e)).split('\n')[0].replace(/^page\.evaluate: (Error: )?/, '');
    out.failed_step = step;
  } finally {
    clearTimeout(timer);
    closing = true;
    await context?.close().catch(() => {});
    server.closeAllConnections?.();
    await new Promise((ok) => server.close(ok));
    await rm(profile, { recursive: true, force: true }).catch(() => {});
  }
  return out;
}

async function main(argv) {
  if (argv.length !== 1) {
    console.error('usage: node web/driver.mjs JOB.json');
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
