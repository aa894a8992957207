// The driver's guards: a page that reaches for another host, or misses a file, fails the job clearly.
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';

import { drive } from './helpers.mjs';

test('a request to a non-local host is blocked and reported', async () => {
  const root = mkdtempSync(join(tmpdir(), 'edgesmith-leaky-'));
  try {
    writeFileSync(join(root, 'index.html'), `<!doctype html><script type="module">
      window.edgesmith = { load: async () => { await fetch('https://huggingface.co/x.json').catch(() => {}); return {}; } };
    </script>`);
    const { code, result, stderr } = await drive({ bundle: root, device: 'wasm', steps: [], timeout_s: 60 });
    assert.equal(code, 1);
    assert.equal(result.ok, false);
    assert.deepEqual(result.blocked_requests, ['https://huggingface.co/x.json']);
    assert.match(result.error, /non-local URL/);
    assert.match(stderr, /self-containment check/);
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
});

test('a bad job is refused with every problem named', async () => {
  const { code, result } = await drive({ bundle: 3, device: 'cuda', steps: [{ op: 1 }] });
  assert.equal(code, 1);
  assert.match(result.error, /`bundle` must be a folder path.*`device` must be "wasm" or "webgpu", got "cuda".*steps\[0\]/);
});

test('a bundle missing a vendored file fails fast, naming the file', async () => {
  const root = mkdtempSync(join(tmpdir(), 'edgesmith-partial-'));
  try {
    writeFileSync(join(root, 'index.html'), '<!doctype html><script type="module" src="./app.js"></script>');
    writeFileSync(join(root, 'app.js'), "import './vendor/transformers/transformers.min.js'; window.edgesmith = {};");
    const { code, result } = await drive({ bundle: root, device: 'wasm', steps: [], timeout_s: 60 });
    assert.equal(code, 1);
    assert.equal(result.failed_step, 'open page');
    assert.deepEqual(result.http_errors, ['404 /vendor/transformers/transformers.min.js']);
    assert.match(result.error, /window.edgesmith never appeared.*404 \/vendor\/transformers\/transformers.min.js/);
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
});
