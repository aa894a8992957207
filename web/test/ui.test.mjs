// The chat page as a person uses it: automatic device/dtype choice, chat template, streamed reply, stats.
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';

import { chromium } from 'playwright-core';

import { chromiumOptions, serveBundle } from '../driver.mjs';
import { tinyBundle } from './helpers.mjs';

async function chatOnce({ plain = false } = {}) {
  const { server, origin } = await serveBundle(tinyBundle(), { plain });
  const profile = mkdtempSync(join(tmpdir(), 'edgesmith-ui-'));
  const context = await chromium.launchPersistentContext(profile, chromiumOptions());
  try {
    const outside = [];
    await context.route('**/*', (route) => {
      if (route.request().url().startsWith(origin + '/')) return route.continue();
      outside.push(route.request().url());
      return route.abort();
    });
    // f16 first: the software adapter has no shader-f16, so the page must fall back to fp32
    const bundle = { model_id: 'tiny-llama', dtypes: { wasm: 'fp32', webgpu: ['q4f16', 'fp32'] }, max_new_tokens: 12 };
    await context.route(`${origin}/bundle.json`, (route) => route.fulfill({ json: bundle }));
    const page = context.pages()[0] ?? await context.newPage();
    await page.goto(`${origin}/index.html`);
    await page.waitForFunction(() => !document.getElementById('send').disabled, null, { timeout: 120_000 });
    const gpu = await page.evaluate(() => window.edgesmith.info().then((i) => i.webgpu.ok));
    const status = await page.textContent('#status');
    assert.match(status, gpu ? /tiny-llama on webgpu \(fp32\)/ : /tiny-llama on wasm \(fp32\)/);

    await page.fill('#prompt', 'ISO date for: 1966/11/21');
    await page.click('#send');
    await page.waitForFunction(() => !document.getElementById('send').disabled, null, { timeout: 120_000 });
    const [user, reply] = await page.$$eval('.msg', (els) => els.map((e) => e.textContent));
    assert.equal(user, 'ISO date for: 1966/11/21');
    assert.ok(reply.length > 0 && !reply.startsWith('error'), `reply: ${reply}`);
    assert.match(await page.textContent('#stats'), /first token \d+ ms · [\d.]+ tok\/s/);
    assert.deepEqual(outside, []);
    return await page.evaluate(() => self.crossOriginIsolated);
  } finally {
    await context.close();
    server.close();
    rmSync(profile, { recursive: true, force: true });
  }
}

test('chat: picks a device and a usable dtype, streams a reply, shows timings', async () => {
  assert.equal(await chatOnce(), true);
});

test('chat from a plain static server (no COOP/COEP, no Range): still chats, not isolated', async () => {
  assert.equal(await chatOnce({ plain: true }), false);
});
