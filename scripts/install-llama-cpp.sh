#!/usr/bin/env bash
# Install llama-cpp-python built to run on any x86-64 CPU of this class, reusing a cached wheel.
#
# There is no Linux wheel on PyPI, so pip compiles llama.cpp (15-20 minutes on 2 cores). The
# default build tunes for the build machine (-march=native) and was seen to die with SIGILL
# (illegal instruction) on a VM whose CPU advertises AMX; this build turns native tuning and AMX
# off and targets AVX2/FMA/F16C, which every x86-64 server CPU of the last decade has.
# The wheel is cached under ~/.cache/edgesmith/wheels/<flags hash>/ so later installs take seconds.
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_CURL=OFF"
KEY=$(printf '%s %s' "$VERSION" "$FLAGS" | sha256sum | cut -c1-12)
CACHE="${EDGESMITH_WHEEL_CACHE:-$HOME/.cache/edgesmith/wheels}/$KEY"
mkdir -p "$CACHE"
wheel=$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
  echo "building llama-cpp-python $VERSION (portable AVX2 build, no AMX); this takes 15-20 minutes on 2 cores" >&2
  CMAKE_ARGS="$FLAGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    python -m pip wheel --no-deps -w "$CACHE" "llama-cpp-python==$VERSION"
  wheel=$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl | head -n 1)
fi
python -m pip install "$wheel"
python -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'ready')"
