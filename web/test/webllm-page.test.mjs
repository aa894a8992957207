// The WebLLM bundle page (web/page-webllm) over the vendored @mlc-ai/web-llm, before any real model
// library exists: web-llm loads from the bundle with no request leaving 127.0.0.1, the app-config's
// bundle-relative model folder is fetched where it lies (web-llm would append "resolve/main/"), and
// what cannot run is refused with a message naming the fix. The real-library run is in
// tests/runtimes/test_webllm_runtime.py.
import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';

import { WEB, drive } from './helpers.mjs';

const ID32 = 'tiny-q4f32_1-MLC';
const ID16 = 'tiny-q4f16_1-MLC';
const NOLIB = 'tiny-q0f32-MLC';
const WASM_HEADER = Uint8Array.from([0, 0x61, 0x73, 0x6d, 1, 0, 0, 0]); // an empty module: no TVM exports

// A bundle laid out like the exporter's, with stub model files (what copy_page + the exporter write).
function stubBundle() {
  const root = mkdtempSync(join(tmpdir(), 'edgesmith-webllm-'));
  for (const f of ['index.html', 'app.js']) copyFileSync(join(WEB, 'page-webllm', f), join(root, f));
  mkdirSync(join(root, 'vendor', 'web-llm'), { recursive: true });
  copyFileSync(join(WEB, 'node_modules', '@mlc-ai', 'web-llm', 'lib', 'index.js'), join(root, 'vendor', 'web-llm', 'index.js'));
  const record = (id, features, lib = `libs/${id}.wasm`) => ({
    model: `models/${id}/`, model_id: id, required_features: features, vram_required_MB: 10, ...(lib ? { model_lib: lib } : {}),
  });
  const model_list = [record(ID32, []), record(ID16, ['shader-f16']), record(NOLIB, [], null)];
  writeFileSync(join(root, 'app-config.json'), JSON.stringify({ model_list, cacheBackend: 'cache' }));
  for (const { model_id } of model_list) {
    mkdirSync(join(root, 'models', model_id), { recursive: true });
    writeFileSync(join(root, 'models', model_id, 'mlc-chat-config.json'), JSON.stringify({ tokenizer_files: ['tokenizer.json'] }));
    writeFileSync(join(root, 'models', model_id, 'tensor-cache.json'), JSON.stringify({ metadata: {}, records: [] }));
  }
  mkdirSync(join(root, 'libs'));
  writeFileSync(join(root, 'libs', `${ID32}.wasm`), WASM_HEADER);
  return root;
}

const root = stubBundle();
after(() => rmSync(root, { recursive: true, force: true }));
const job = (model_id) => drive({ bundle: root, device: 'webgpu', model_id, steps: [], timeout_s: 120 });

test('an f16 quantisation on an adapter without shader-f16 is refused, naming the f32 fallback', async () => {
  const { code, result } = await job(ID16);
  assert.equal(code, 1);
  assert.equal(result.failed_step, 'load');
  // SwiftShader has no shader-f16; a machine whose adapter has it gets past this check to the missing library
  if (/shader-f16/.test(result.error)) {
    assert.match(result.error, new RegExp(`${ID16} needs the WebGPU feature\\(s\\) shader-f16.*fix: load an f32 quantisation such as ${ID32}`));
  } else {
    assert.match(result.error, /model library .*HTTP 404/);
  }
  assert.deepEqual(result.blocked_requests, [], 'the vendored web-llm must not reach for a CDN');
});

test("web-llm reads the bundle's model folder as written and fails at the stub library, clearly", async () => {
  const { code, result } = await job(ID32);
  assert.equal(code, 1);
  assert.match(result.error, new RegExp(`web-llm could not load ${ID32} before any progress \\(at the model library\\)`));
  // mlc-chat-config.json was fetched (before the library) from models/<id>/, not models/<id>/resolve/main/
  assert.deepEqual(result.http_errors.filter((e) => !e.includes('favicon')), []);
  assert.deepEqual(result.blocked_requests, []);
});

test('a record without a model library, or an unknown id, is refused with the reason', async () => {
  const nolib = await job(NOLIB);
  assert.match(nolib.result.error, new RegExp(`${NOLIB} has no model library in this bundle`));
  const unknown = await job('nope');
  assert.match(unknown.result.error, new RegExp(`model_id "nope" is not in app-config.json; it has: ${ID32}, ${ID16}, ${NOLIB}`));
});

test("the vendored web-llm still has the internals the page relies on (an upgrade must revisit app.js)", async () => {
  const { readFileSync } = await import('node:fs');
  const src = readFileSync(join(WEB, 'node_modules', '@mlc-ai', 'web-llm', 'lib', 'index.js'), 'utf8');
  for (const needle of [
    'this.loadedModelIdToPipeline = new Map()', // pipeline(): the loaded model's LLMChatPipeline
    'this.loadedModelIdToChatConfig = new Map()', // load(): the chat config as web-llm merged it
    '(_a = this.logitProcessor) === null', // logits(): the processor is read per step, so it can be swapped
    '    getInputData() {', // chatIds(): the prompt ids web-llm prefills
    'this.outputIds.push(nextToken)', // chat(): the reply's ids
    'if (!modelUrl.match(/.+\\/resolve\\/.+\\//))', // absoluteRecord(): why "resolve/../" is appended
    'else if (!wasmUrl.startsWith("http")) {', // a relative model_lib is fetched uncached
  ]) assert.ok(src.includes(needle), `web-llm's lib/index.js no longer contains ${needle}`);
});
