// The driver's session mode (node driver.mjs --session): one page kept loaded across many calls,
// JSON lines in and out, as the Python browser runtime uses it.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { after, before, test } from 'node:test';

import { fixture, maxAbsDiff, TOL, tinyBundle, WEB } from './helpers.mjs';

const MODEL = 'tiny-llama';
const running = new Set();

/** Start `node driver.mjs --session` and send `header`; every stdout line must be a JSON reply. */
function startSession(header) {
  const child = spawn(process.execPath, [join(WEB, 'driver.mjs'), '--session'], { stdio: ['pipe', 'pipe', 'pipe'] });
  running.add(child);
  let stderr = '';
  child.stderr.on('data', (d) => { stderr += d; });
  const exited = new Promise((ok) => child.on('close', (code) => { running.delete(child); ok(code); }));
  const replies = createInterface({ input: child.stdout })[Symbol.asyncIterator]();
  const next = async () => {
    const r = await replies.next();
    if (r.done) throw new Error(`the driver exited without a reply; stderr: ${stderr}`);
    return JSON.parse(r.value);
  };
  const send = (line) => {
    child.stdin.write(`${typeof line === 'string' ? line : JSON.stringify(line)}\n`);
    return next();
  };
  return { child, send, exited, header: send(header), stderr: () => stderr };
}

/** Resolves to the exit code, or fails if the process is still running after `ms`. */
function exitWithin(session, ms) {
  let timer;
  const late = new Promise((_, fail) => {
    timer = setTimeout(() => fail(new Error(`the driver still runs ${ms} ms after its input ended`)), ms);
  });
  return Promise.race([session.exited, late]).finally(() => clearTimeout(timer));
}

let bundle, fx, expected, session, work;

before(async () => {
  bundle = tinyBundle();
  fx = fixture(bundle);
  expected = fx.models[MODEL];
  work = mkdtempSync(join(tmpdir(), 'edgesmith-session-'));
  session = startSession({ bundle, device: 'wasm', dtype: expected.dtype, model_id: MODEL, timeout_s: 240 });
});

after(() => {
  for (const child of running) child.kill();
  rmSync(work, { recursive: true, force: true });
});

test('header: serves, launches, loads, and answers with load and info', async () => {
  const h = await session.header;
  assert.equal(h.ok, true, `header failed at ${h.failed_step}: ${h.error}\nconsole: ${h.console?.join('\n')}`);
  assert.equal(h.load.device, 'wasm');
  assert.equal(h.load.dtype, expected.dtype);
  assert.equal(h.load.model_id, MODEL);
  assert.equal(h.crossOriginIsolated, true);
  assert.equal(h.info.loaded.model_id, MODEL);
  assert.deepEqual(h.load.eos_token_id, [fx.eos_token_id]);
});

test('encode and chatIds give the Hugging Face tokenizer ids', async () => {
  for (const s of fx.strings) {
    const r = await session.send({ op: 'encode', args: [s.text] });
    assert.equal(r.ok, true, r.error);
    assert.deepEqual(r.result, s.ids, `encode(${JSON.stringify(s.text)})`);
    assert.ok(r.ms >= 0);
  }
  for (const [i, c] of fx.chats.entries()) {
    const r = await session.send({ op: 'chatIds', args: [c.messages] });
    assert.deepEqual(r.result, c.ids, `chatIds(chat ${i})`);
  }
});

test('logitsAll with save: every position as float32 in the file, the last row matching onnxruntime', async () => {
  const { ids } = expected.greedy[0];
  const path = join(work, 'logits.f32');
  const r = await session.send({ op: 'logitsAll', args: [ids], save: path });
  assert.equal(r.ok, true, r.error);
  const vocab = expected.last_logits.length;
  assert.deepEqual(r.result, { shape: [ids.length, vocab], dtype: 'float32', saved: path, bytes: ids.length * vocab * 4 });
  assert.ok(!existsSync(`${path}.tmp`), 'the temporary file was left behind');
  const raw = readFileSync(path);
  assert.equal(raw.length, ids.length * vocab * 4);
  const rows = new Float32Array(raw.buffer, raw.byteOffset, raw.length / 4);
  const last = Array.from(rows.subarray((ids.length - 1) * vocab));
  const diff = maxAbsDiff(last, expected.last_logits);
  assert.ok(diff <= TOL.logits, `last row differs from onnxruntime by ${diff} (tolerance ${TOL.logits})`);
  // the same forward as logits(): its last row is the same numbers, and earlier rows are other positions'
  const lastOnly = await session.send({ op: 'logits', args: [ids] });
  assert.deepEqual(last, lastOnly.result);
  assert.ok(maxAbsDiff(Array.from(rows.subarray(0, vocab)), last) > 1e-3, 'the first row repeats the last one');

  const inline = await session.send({ op: 'logitsAll', args: [ids.slice(0, 2)] });
  assert.equal(Buffer.from(inline.result.b64, 'base64').length, 2 * vocab * 4);
  assert.deepEqual(inline.result.shape, [2, vocab]);
});

test('greedy: exactly n tokens without stop ids; with them, the prefix ending at the first stop id', async () => {
  for (const g of expected.greedy) {
    for (const stop of [undefined, null, []]) {
      const r = await session.send({ op: 'greedy', args: stop === undefined ? [g.ids, g.new_tokens] : [g.ids, g.new_tokens, stop] });
      assert.deepEqual(r.result, g.expected, `greedy without stop ids (${JSON.stringify(stop)})`);
    }
    // a stop id that first appears part-way through the expected sequence
    const at = g.expected.findIndex((t, i) => i >= 3 && g.expected.indexOf(t) === i);
    assert.ok(at > 0 && at < g.expected.length - 1, 'the fixture has no stop id candidate part-way through');
    const stopId = g.expected[at];
    const never = [...Array(expected.last_logits.length).keys()].find((t) => !g.expected.includes(t));
    const r = await session.send({ op: 'greedy', args: [g.ids, g.new_tokens, [never, stopId]] });
    assert.deepEqual(r.result, g.expected.slice(0, at + 1), `greedy stopping at ${stopId}`);
    const noStop = await session.send({ op: 'greedy', args: [g.ids, g.new_tokens, [never]] });
    assert.deepEqual(noStop.result, g.expected, 'the stop-id loop decodes other tokens than generate');
  }
  const none = await session.send({ op: 'greedy', args: [expected.greedy[0].ids, 0, [1]] });
  assert.deepEqual(none.result, []);
});

test('bench reports timings, tokens and the browser-measured memory', async () => {
  const g = expected.greedy[0];
  const r = await session.send({ op: 'bench', args: [g.ids, 4, 1, 0] });
  assert.equal(r.ok, true, r.error);
  assert.deepEqual(r.result.tokens, g.expected.slice(0, 4));
  assert.ok(r.result.ua_memory.bytes > 0, `ua_memory: ${JSON.stringify(r.result.ua_memory)}`);
  assert.ok(r.result.ua_memory.ms < 10_000, `measureUserAgentSpecificMemory took ${r.result.ua_memory.ms} ms`);
});

test('bad calls reply ok:false and the session keeps working', async () => {
  const unknown = await session.send({ op: 'nope', args: [] });
  assert.equal(unknown.ok, false);
  assert.match(unknown.error, /unknown op nope; known: .*logitsAll/);
  assert.ok(Array.isArray(unknown.console));
  const garbage = await session.send('not json');
  assert.match(garbage.error, /bad call line \(not JSON/);
  const badArgs = await session.send({ op: 'encode', args: 'x' });
  assert.match(badArgs.error, /`args` must be a list/);
  const noB64 = await session.send({ op: 'encode', args: ['x'], save: join(work, 'x') });
  assert.match(noB64.error, /"save" given but encode returned no b64/);
  const badIds = await session.send({ op: 'logitsAll', args: [[]] });
  assert.match(badIds.error, /logitsAll: ids must be a non-empty list/);
  const r = await session.send({ op: 'encode', args: [fx.strings[0].text] });
  assert.deepEqual(r.result, fx.strings[0].ids);
  const g = expected.greedy[0];
  assert.deepEqual((await session.send({ op: 'greedy', args: [g.ids, 3] })).result, g.expected.slice(0, 3));
});

test('closing stdin closes the browser and exits 0 promptly', async () => {
  session.child.stdin.end();
  assert.equal(await exitWithin(session, 15_000), 0, session.stderr());
});

// A stand-in page (no model): the driver's own behaviour, quickly.
function fakeBundle() {
  const dir = mkdtempSync(join(work, 'fake-'));
  writeFileSync(join(dir, 'index.html'), `<!doctype html><script type="module">
    window.edgesmith = {
      load: async (a) => ({ ...a, fake: true }),
      info: async () => ({ fake: true }),
      leak: async () => { await fetch('https://huggingface.co/x.json').catch(() => {}); return 1; },
      hang: () => new Promise(() => {}),
    };
  </script>`);
  return dir;
}

test('a call that reaches for another host fails naming it; {"op": "close"} exits 0', async () => {
  const s = startSession({ bundle: fakeBundle(), device: 'wasm', timeout_s: 60 });
  assert.equal((await s.header).ok, true, (await s.header).error);
  const leak = await s.send({ op: 'leak' });
  assert.equal(leak.ok, false);
  assert.match(leak.error, /non-local URL\(s\): https:\/\/huggingface\.co\/x\.json/);
  s.child.stdin.write('{"op": "close"}\n');
  assert.equal(await exitWithin(s, 15_000), 0, s.stderr());
});

test('a call past timeout_s replies ok:false, then the driver exits 1', async () => {
  const s = startSession({ bundle: fakeBundle(), device: 'wasm', timeout_s: 5 });
  assert.equal((await s.header).ok, true, (await s.header).error);
  const r = await s.send({ op: 'hang' });
  assert.equal(r.ok, false);
  assert.match(r.error, /timed out after 5 s \(during hang\)/);
  assert.equal(await exitWithin(s, 15_000), 1);
});

test('a bad header is refused with every problem named, and exits 1', async () => {
  const s = startSession({ bundle: 3, device: 'cuda', steps: [] });
  const h = await s.header;
  assert.equal(h.ok, false);
  assert.equal(h.failed_step, 'header');
  assert.match(h.error, /`bundle` must be a folder path.*`device` must be "wasm" or "webgpu", got "cuda".*takes no `steps`/);
  assert.equal(await exitWithin(s, 10_000), 1);
});
