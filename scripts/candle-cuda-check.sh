#!/usr/bin/env bash
# Compile check of linattn-candle's `cuda` feature on a machine without a GPU or a CUDA toolkit:
# candle's `cuda` builds candle's own kernels with nvcc in its build script, so CUDA 13's nvcc
# comes from NVIDIA's PyPI wheels (scripts/install-nvcc-wheels.sh), targeting compute capability
# 8.0 (CUDA_COMPUTE_CAP). Then `cargo check --all-targets`: the library, its tests and the example
# type-check against candle's real CUDA backend. Linking (tests, binaries) would need libcuda,
# libcudart, libcublas, libcublasLt and libcurand, which candle links at load time; they come
# with a GPU machine's driver and toolkit, not with this check.
#
# `--empty-kernels` (what CI runs): candle's kernel sources are handed to nvcc empty
# (scripts/nvcc-empty-kernels), since a type check never reads them: candle-kernels' build then
# takes seconds instead of minutes (measured on the 2-core machine: 5 min 27 s of single-threaded
# nvcc for the real kernels, which pushed CI past 42 minutes). Without it, the real kernels.
#
# Its own target folder (CANDLE_CUDA_TARGET_DIR, default target/candle-cuda) lets it run beside
# the main build: scripts/test.sh runs it in the background while the tests run.
set -euo pipefail
cd "$(dirname "$0")/.."
paths="$(scripts/install-nvcc-wheels.sh .tools/cuda13)"
NVCC="$(sed -n 's/^NVCC=//p' <<<"$paths")"
if [[ "${1:-}" == --empty-kernels ]]; then
    export LINATTN_REAL_NVCC="$NVCC"
    NVCC="$PWD/scripts/nvcc-empty-kernels"
    # A different nvcc: the build script's outputs must not be taken from a real build's cache.
    CANDLE_CUDA_TARGET_DIR="${CANDLE_CUDA_TARGET_DIR:-target/candle-cuda-empty}"
fi
export NVCC
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
export CARGO_TARGET_DIR="${CANDLE_CUDA_TARGET_DIR:-target/candle-cuda}"
echo "nvcc: $NVCC ($("$NVCC" --version | tail -2 | head -1)), compute capability $CUDA_COMPUTE_CAP"
cargo check --locked -p linattn-candle --features cuda --all-targets
echo "linattn-candle --features cuda: compile check passed"
