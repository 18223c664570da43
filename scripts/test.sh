#!/usr/bin/env bash
# The whole test suite, from a fresh clone. This is the README's test command; .ci/run calls it.
#
# What a fresh machine lacks is installed first (idempotent):
#  - Mesa's software Vulkan driver (llvmpipe) and the Vulkan loader, so the CubeCL kernels really run
#    on the CPU (apt, only when running as root; otherwise those tests print `skipped: no wgpu adapter`);
#  - the NVRTC and ptxas wheels from PyPI into .tools/cuda, so every CUDA kernel is compiled for
#    sm_80 and sm_90 and checked for register spills, without a GPU;
#  - CUDA 13's nvcc wheels into .tools/cuda13 (scripts/candle-cuda-check.sh), for the compile
#    check of linattn-candle's `cuda` feature (candle's own kernels are built with nvcc).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! ldconfig -p 2>/dev/null | grep -q 'libvulkan.so.1' || ! ls /usr/share/vulkan/icd.d/lvp_icd.*.json >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing mesa-vulkan-drivers libvulkan1 (software Vulkan for the CubeCL tests)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends mesa-vulkan-drivers libvulkan1 \
      || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends mesa-vulkan-drivers libvulkan1; }
  else
    echo "note: no Vulkan driver and not root: the CubeCL tests will print 'skipped: no wgpu adapter'"
  fi
fi

echo "== NVRTC and ptxas wheels (.tools/cuda)"
cuda_paths="$(scripts/install-cuda-wheels.sh .tools/cuda)"
# The library also finds .tools/cuda of this checkout by itself; the variable makes it explicit.
LINATTN_NVRTC_DIR="$(sed -n 's/^NVRTC_LIB_DIR=//p' <<<"$cuda_paths")"
export LINATTN_NVRTC_DIR
echo "libnvrtc: $LINATTN_NVRTC_DIR"

echo "== cargo test"
# The NVRTC compile tests also write the PTX of every variant here, for the ptxas report below
# (which would otherwise compile everything a second time).
LINATTN_PTX_DIR="$(mktemp -d)"
export LINATTN_PTX_DIR
trap 'rm -rf "$LINATTN_PTX_DIR"' EXIT
cargo test --workspace --all-targets --no-run
# While the tests run, the compile check of linattn-candle's `cuda` feature (real nvcc, candle's
# kernel sources emptied: a type check does not read them) runs in its own target folder.
candle_log="$(mktemp)"
scripts/candle-cuda-check.sh --empty-kernels >"$candle_log" 2>&1 &
candle_pid=$!
cargo test --workspace --all-targets
cargo test --workspace --doc
echo "== linattn-candle --features cuda (compile check, scripts/candle-cuda-check.sh)"
if wait "$candle_pid"; then
  tail -n 3 "$candle_log"
else
  cat "$candle_log"
  echo "error: the compile check of linattn-candle's cuda feature failed" >&2
  exit 1
fi

echo "== cargo doc (zero warnings)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps

echo "== ptxas: registers, spills, shared memory per kernel (kernels/RESOURCES.md); fails on a spill in a hot kernel"
scripts/ptxas-report.sh .tools/cuda

echo "== the GPU bundle (size bound) and a dry run of the GPU script on this machine"
scripts/gpu-bundle.sh
dry_out="$(mktemp -d)"
OUT="$dry_out" scripts/gpu-run.sh --dry-run
rm -rf "$dry_out"
