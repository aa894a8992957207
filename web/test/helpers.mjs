// Shared by the web tests: the tiny bundle (built once per change of its inputs) and the driver CLI.
import { execFileSync, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  existsSync, mkdtempSync, readdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const WEB = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const REPO = resolve(WEB, '..');
const CACHE = join(WEB, '.cache', 'tiny-bundle');

// Tolerances, in one place, each with its reason.
export const TOL = {
  // last-position logits of the tiny model (|logit| < ~5), float32 compute (the int4 model too: its
  // weights are dequantised, accuracy_level 0): onnxruntime-web's wasm and WebGPU kernels sum in
  // another order than native MLAS, measured up to 2e-6 here; a wrong mask, rotary or cache shows
  // up as differences of order 1. (SmolLM2-135M fp32, 30 layers: 6e-5 on wasm and WebGPU.)
  logits: 1e-4,
};

// What the bundle is made from: a change to any of these rebuilds it.
const INPUTS = ['web/test/make_tiny_bundle.py', 'web/page', 'web/vendor-files.json', 'web/package-lock.json',
  'exporters/onnx', 'exporters/webgpu', 'exporters/hf.py', 'runtimes/onnxruntime_runtime.py', 'runtimes/base.py', 'tests/conftest.py'];

function inputsHash() {
  const h = createHash('sha256');
  const add = (rel) => {
    const p = join(REPO, rel);
    if (!existsSync(p)) return;
    if (statSync(p).isDirectory()) {
      for (const name of readdirSync(p).sort()) if (name !== '__pycache__') add(join(rel, name));
    } else {
      h.update(rel).update(readFileSync(p));
    }
  };
  INPUTS.forEach(add);
  return h.digest('hex');
}

function python() {
  if (process.env.PYTHON) return process.env.PYTHON;
  const venv = join(REPO, '.venv', 'bin', 'python');
  return existsSync(venv) ? venv : 'python3';
}

/** The tiny bundle's folder, built by make_tiny_bundle.py unless an up-to-date one is cached. */
export function tinyBundle() {
  const stamp = join(CACHE, 'inputs.sha256');
  const hash = inputsHash();
  if (existsSync(stamp) && readFileSync(stamp, 'utf8') === hash) return CACHE;
  const tmp = `${CACHE}.tmp-${process.pid}`;
  execFileSync(python(), [join(WEB, 'test', 'make_tiny_bundle.py'), tmp], {
    cwd: REPO, stdio: ['ignore', 'ignore', 'inherit'],
    env: { ...process.env, HF_HUB_DISABLE_PROGRESS_BARS: '1', TRANSFORMERS_VERBOSITY: 'error', TQDM_DISABLE: '1' },
  });
  writeFileSync(join(tmp, 'inputs.sha256'), hash);
  rmSync(CACHE, { recursive: true, force: true });
  renameSync(tmp, CACHE); // whole or absent: an interrupted build never looks complete
  return CACHE;
}

export const fixture = (bundle) => JSON.parse(readFileSync(join(bundle, 'fixture.json'), 'utf8'));

/** Run `node driver.mjs JOB.json`; resolves to {code, result (the parsed stdout line), stderr}. */
export function drive(job) {
  const dir = mkdtempSync(join(tmpdir(), 'edgesmith-job-'));
  const path = join(dir, 'job.json');
  writeFileSync(path, JSON.stringify({ timeout_s: 240, ...job }));
  return new Promise((ok, fail) => {
    const child = spawn(process.execPath, [join(WEB, 'driver.mjs'), path], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '', stderr = '';
    child.stdout.on('data', (d) => { stdout += d; });
    child.stderr.on('data', (d) => { stderr += d; });
    child.on('error', fail);
    child.on('close', (code) => {
      rmSync(dir, { recursive: true, force: true });
      const lines = stdout.trim().split('\n');
      let result = null;
      try { result = JSON.parse(lines.at(-1)); } catch { /* reported below */ }
      if (!result) fail(new Error(`driver printed no JSON line (exit ${code}): ${stderr || stdout}`));
      else ok({ code, result, stderr });
    });
  });
}

/** Results of a job's steps by op name, failing with the driver's own error when it did not finish. */
export function stepResults({ code, result }) {
  if (code !== 0 || !result.ok) {
    throw new Error(`driver failed (exit ${code}) at ${result.failed_step}: ${result.error}\nconsole: ${result.console?.join('\n')}`);
  }
  return result.steps.map((s) => s.result);
}

export function maxAbsDiff(a, b) {
  if (a.length !== b.length) return Infinity;
  return a.reduce((m, x, i) => Math.max(m, Math.abs(x - b[i])), 0);
}
