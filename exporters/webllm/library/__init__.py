"""The WebLLM model library: TVM-compiled model code linked with TVM's web runtime into a .wasm."""
