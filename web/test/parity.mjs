// One driver job per (device, model) that checks the browser against the Python fixture:
// tokenizer ids, greedy ids (model.generate path), last-position logits and the bench loop.
import assert from 'node:assert/strict';

import { drive, fixture, maxAbsDiff, stepResults, TOL, tinyBundle } from './helpers.mjs';

export async function runParity({ device, model_id, tokenizer = false }) {
  const bundle = tinyBundle();
  const fx = fixture(bundle);
  const expected = fx.models[model_id];
  const steps = [
    ...expected.greedy.map((g) => ({ op: 'greedy', args: [g.ids, g.new_tokens] })),
    { op: 'logits', args: [expected.greedy[0].ids] },
    { op: 'bench', args: [expected.greedy[0].ids, 8, 1, 0] },
  ];
  if (tokenizer) {
    steps.push(...fx.strings.map((s) => ({ op: 'encode', args: [s.text] })));
    steps.push(...fx.chats.map((c) => ({ op: 'chatIds', args: [c.messages] })));
  }
  const run = await drive({ bundle, device, dtype: expected.dtype, model_id, steps });
  const results = stepResults(run);
  const { result } = run;

  assert.equal(result.load.device, device);
  assert.equal(result.load.dtype, expected.dtype);
  assert.equal(result.crossOriginIsolated, true, 'no cross-origin isolation: onnxruntime-web runs single-threaded');
  assert.deepEqual(result.blocked_requests, [], 'the page requested non-local URLs');
  assert.deepEqual(result.load.eos_token_id, [fx.eos_token_id]);

  expected.greedy.forEach((g, i) => assert.deepEqual(results[i], g.expected, `greedy ids of prompt ${i}`));
  const logits = results[expected.greedy.length];
  const diff = maxAbsDiff(logits, expected.last_logits);
  assert.ok(diff <= TOL.logits, `last logits differ from onnxruntime by ${diff} (tolerance ${TOL.logits})`);
  const bench = results[expected.greedy.length + 1];
  assert.deepEqual(bench.tokens, expected.greedy[0].expected.slice(0, 8), 'the bench loop decodes other tokens than generate');
  for (const key of ['ttft_ms', 'prefill_tps', 'decode_tps']) {
    assert.equal(bench[key].length, 1);
    assert.ok(bench[key][0] > 0, `${key} ${bench[key][0]}`);
  }
  if (tokenizer) {
    const rest = results.slice(expected.greedy.length + 2);
    fx.strings.forEach((s, i) => assert.deepEqual(rest[i], s.ids, `encode(${JSON.stringify(s.text)})`));
    fx.chats.forEach((c, i) => assert.deepEqual(rest[fx.strings.length + i], c.ids, `chatIds(chat ${i})`));
  }
  return result;
}
