#!/usr/bin/env bash
# Install llama-cpp-python built to run on any x86-64 CPU of this class, reusing a cached wheel:
# the same as `edgesmith setup llama-cpp` (toolchain/cli/setup.py holds the version, the build flags and why).
#
# There is no Linux wheel on PyPI, so pip compiles llama.cpp (15-20 minutes on 2 cores) the first time,
# with native tuning and AMX off (a native build was seen to die with SIGILL on a VM whose CPU advertises
# AMX); the wheel is cached under ~/.cache/edgesmith/wheels/<flags hash>/ so later installs take seconds.
set -euo pipefail
python -m toolchain.cli setup llama-cpp --force
python -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'ready')"
