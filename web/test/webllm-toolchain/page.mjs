// Runs one function of a TVM model library on WebGPU the way @mlc-ai/web-llm loads a model library:
// fetch the .wasm, tvmjs.instantiate with tvmjs's WASI polyfill, detectGPUDevice, initWebGPU,
// createVirtualMachine, asyncLoadWebGPUPipelines. `tvmjs` is web-llm's own bundled copy (run.mjs
// serves web-llm's lib/index.js with that internal binding exported).
import { tvmjs } from './webllm.js';

async function run({ wasm, func, inputs, shape }) {
  const t0 = performance.now();
  const bytes = await (await fetch(wasm)).arrayBuffer();
  const tvm = await tvmjs.instantiate(new Uint8Array(bytes).buffer, tvmjs.createPolyfillWASI(), console.log);
  const gpu = await tvmjs.detectGPUDevice();
  if (!gpu) throw new Error('no WebGPU adapter');
  tvm.initWebGPU(gpu.device);
  const dev = tvm.webgpu();
  tvm.beginScope();
  const vm = tvm.detachFromCurrentScope(tvm.createVirtualMachine(dev));
  await tvm.asyncLoadWebGPUPipelines(vm.getInternalModule());
  const loadMs = performance.now() - t0;
  const f = vm.getFunction(func);
  const args = inputs.map((xs) => tvm.empty(shape, 'float32', dev).copyFrom(Float32Array.from(xs)));
  const out = f(...args);
  const host = tvm.empty(shape, 'float32', tvm.cpu()).copyFrom(out);
  await dev.sync();
  const values = Array.from(host.toArray());
  tvm.endScope();
  const info = gpu.adapterInfo ?? {};
  return {
    values, load_ms: loadMs,
    adapter: { vendor: info.vendor, architecture: info.architecture, description: info.description },
  };
}

window.webllmToolchainCheck = { run };
