// The driver's static server: Range requests, MIME types, cross-origin isolation, no escape from the root.
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';

import { parseRange, serveBundle } from '../driver.mjs';

let root, server, origin;
const BYTES = Buffer.from(Array.from({ length: 256 }, (_, i) => i));

before(async () => {
  root = mkdtempSync(join(tmpdir(), 'edgesmith-serve-'));
  mkdirSync(join(root, 'models', 'm', 'onnx'), { recursive: true });
  writeFileSync(join(root, 'index.html'), '<!doctype html>');
  writeFileSync(join(root, 'x.wasm'), BYTES);
  writeFileSync(join(root, 'x.mjs'), 'export {}');
  writeFileSync(join(root, 'x.json'), '{}');
  writeFileSync(join(root, 'models', 'm', 'onnx', 'model.onnx'), BYTES);
  writeFileSync(join(root, 'models', 'm', 'onnx', 'model.onnx_data'), BYTES);
  writeFileSync(join(tmpdir(), 'edgesmith-outside.txt'), 'secret');
  ({ server, origin } = await serveBundle(root));
});

after(async () => {
  await new Promise((ok) => server.close(ok));
  rmSync(root, { recursive: true, force: true });
});

test('parseRange: open, closed, suffix and unsatisfiable ranges', () => {
  assert.equal(parseRange(undefined, 10), null);
  assert.deepEqual(parseRange('bytes=0-3', 10), [0, 3]);
  assert.deepEqual(parseRange('bytes=4-', 10), [4, 9]);
  assert.deepEqual(parseRange('bytes=5-100', 10), [5, 9]);
  assert.deepEqual(parseRange('bytes=-3', 10), [7, 9]);
  assert.equal(parseRange('bytes=10-', 10), 'bad');
  assert.equal(parseRange('bytes=1-2,4-5', 10), 'bad');
  assert.equal(parseRange('items=0-1', 10), 'bad');
});

test('serves 127.0.0.1 only, with isolation headers and MIME types', async () => {
  assert.match(origin, /^http:\/\/127\.0\.0\.1:\d+$/);
  const types = { '/x.wasm': 'application/wasm', '/x.mjs': 'text/javascript', '/x.json': 'application/json',
    '/models/m/onnx/model.onnx': 'application/octet-stream', '/models/m/onnx/model.onnx_data': 'application/octet-stream',
    '/': 'text/html; charset=utf-8' };
  for (const [path, type] of Object.entries(types)) {
    const r = await fetch(origin + path);
    assert.equal(r.status, 200, path);
    assert.equal(r.headers.get('content-type'), type, path);
    assert.equal(r.headers.get('cross-origin-opener-policy'), 'same-origin');
    assert.equal(r.headers.get('cross-origin-embedder-policy'), 'require-corp');
    assert.equal(r.headers.get('accept-ranges'), 'bytes');
    await r.arrayBuffer();
  }
});

test('answers Range requests with 206 and Content-Range', async () => {
  const r = await fetch(`${origin}/models/m/onnx/model.onnx_data`, { headers: { Range: 'bytes=16-31' } });
  assert.equal(r.status, 206);
  assert.equal(r.headers.get('content-range'), 'bytes 16-31/256');
  assert.equal(r.headers.get('content-length'), '16');
  assert.deepEqual(Buffer.from(await r.arrayBuffer()), BYTES.subarray(16, 32));
  const bad = await fetch(`${origin}/x.wasm`, { headers: { Range: 'bytes=300-' } });
  assert.equal(bad.status, 416);
  assert.equal(bad.headers.get('content-range'), 'bytes */256');
});

test('404 for missing files and for paths outside the bundle', async () => {
  assert.equal((await fetch(`${origin}/nope.js`)).status, 404);
  assert.equal((await fetch(`${origin}/%2e%2e/edgesmith-outside.txt`)).status, 404);
  assert.equal((await fetch(`${origin}/..%2fedgesmith-outside.txt`)).status, 404);
});
