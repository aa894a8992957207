// WebGPU (fp32 compute; no f16: the software adapter lacks shader-f16): headless chromium without a GPU gets SwiftShader's software adapter.
import assert from 'node:assert/strict';
import { before, test } from 'node:test';

import { drive, tinyBundle } from './helpers.mjs';
import { runParity } from './parity.mjs';

let unavailable = null;

before(async () => {
  const { result } = await drive({ bundle: tinyBundle(), device: 'wasm', steps: [{ op: 'info', args: [] }] });
  const webgpu = result.steps?.[0]?.result?.webgpu;
  if (!webgpu?.ok) unavailable = `WebGPU unavailable in headless chromium: ${webgpu?.reason ?? result.error}`;
});

const required = process.env.EDGESMITH_REQUIRE_WEBGPU === '1';

for (const model_id of ['tiny-llama', 'tiny-llama-fused', 'tiny-llama-q4']) {
  test(`webgpu, ${model_id}: greedy, logits and bench match onnxruntime`, async (t) => {
    if (unavailable) {
      assert.ok(!required, unavailable);
      t.skip(unavailable);
      return;
    }
    const result = await runParity({ device: 'webgpu', model_id });
    assert.ok(result.load.adapter_info, 'no adapter info');
  });
}
