// node web/test/webllm-toolchain/run.mjs JOB.json: load a TVM model library (.wasm) in headless
// chromium with the tvmjs bundled in @mlc-ai/web-llm, call one function on WebGPU, and print one JSON
// line: {ok, values, load_ms, adapter, chromium_args} or {ok: false, error, console}.
// JOB.json: {"wasm": path, "func": name, "inputs": [[...], ...], "shape": [...], "timeout_s"?: N}
//
// web-llm's lib/index.js keeps its tvmjs (the build of @mlc-ai/web-runtime it ships) in an internal
// binding; the page gets that same code by serving index.js with one export line appended.
import { copyFile, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

import { chromiumOptions, serveBundle } from '../../driver.mjs';

const HERE = dirname(fileURLToPath(import.meta.url));
const WEBLLM = resolve(HERE, '..', '..', 'node_modules', '@mlc-ai', 'web-llm');
// The name rollup gave web-llm 0.2.86's bundled tvmjs module in lib/index.js.
const TVMJS_BINDING = 'libExports$2';

async function webllmWithTvmjsExport() {
  const version = JSON.parse(await readFile(join(WEBLLM, 'package.json'), 'utf8')).version;
  const source = await readFile(join(WEBLLM, 'lib', 'index.js'), 'utf8');
  const probe = `var ${TVMJS_BINDING} = `;
  const at = source.indexOf(probe);
  if (at < 0 || !source.slice(at, at + 200).includes('requireLib')) {
    throw new Error(`@mlc-ai/web-llm ${version}: lib/index.js has no "${probe}requireLib...()" (the bundled tvmjs moved; update TVMJS_BINDING)`);
  }
  return { version, text: `${source}\nexport { ${TVMJS_BINDING} as tvmjs };\n` };
}

async function main(jobPath) {
  const job = JSON.parse(await readFile(jobPath, 'utf8'));
  const root = await mkdtemp(join(tmpdir(), 'edgesmith-webllm-toolchain-'));
  const consoleLines = [];
  let server, context, profile;
  try {
    const webllm = await webllmWithTvmjsExport();
    await writeFile(join(root, 'webllm.js'), webllm.text);
    await copyFile(join(HERE, 'index.html'), join(root, 'index.html'));
    await copyFile(join(HERE, 'page.mjs'), join(root, 'page.mjs'));
    await copyFile(job.wasm, join(root, 'lib.wasm'));
    let origin;
    ({ server, origin } = await serveBundle(root));
    const { chromium } = await import('playwright-core');
    profile = await mkdtemp(join(tmpdir(), 'edgesmith-chromium-'));
    const options = chromiumOptions();
    context = await chromium.launchPersistentContext(profile, options); // a fresh --user-data-dir
    await context.route('**/*', (route) => (route.request().url().startsWith(origin + '/') ? route.continue() : route.abort()));
    const page = context.pages()[0] ?? await context.newPage();
    page.on('console', (m) => { if (consoleLines.length < 50) consoleLines.push(`${m.type()}: ${m.text()}`); });
    page.on('pageerror', (e) => consoleLines.push(`pageerror: ${e.message}`));
    await page.goto(`${origin}/index.html`);
    await page.waitForFunction(() => window.webllmToolchainCheck, null, { timeout: 30_000 });
    page.setDefaultTimeout((job.timeout_s ?? 120) * 1000);
    const result = await page.evaluate((args) => window.webllmToolchainCheck.run(args),
      { wasm: 'lib.wasm', func: job.func, inputs: job.inputs, shape: job.shape });
    return { ok: true, ...result, webllm_version: webllm.version, chromium_args: options.args, console: consoleLines };
  } catch (e) {
    return { ok: false, error: (e?.message ?? String(e)).split('\n').slice(0, 5).join(' | '), console: consoleLines };
  } finally {
    await context?.close().catch(() => {});
    server?.close();
    await rm(root, { recursive: true, force: true });
    if (profile) await rm(profile, { recursive: true, force: true });
  }
}

const out = await main(process.argv[2]);
process.stdout.write(JSON.stringify(out) + '\n');
process.exitCode = out.ok ? 0 : 1;
