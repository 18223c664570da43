#!/usr/bin/env bash
# Installs the CUDA compiler pieces linattn needs on a machine without a CUDA toolkit, from the
# NVIDIA PyPI wheels, into DEST (default .tools/cuda):
#   nvidia-cuda-nvrtc-cu12    libnvrtc.so.12 + libnvrtc-builtins (run-time compilation to PTX)
#   nvidia-cuda-runtime-cu12  headers (not needed by our kernels, kept for other kernel families)
#   nvidia-cuda-nvcc-cu12     ptxas (register / spill / shared-memory report without a GPU)
# Idempotent: a second run with the wheels present only prints the paths.
# Prints (last lines, machine-readable):
#   NVRTC_LIB_DIR=<folder to put on LD_LIBRARY_PATH>
#   PTXAS=<path of ptxas>
set -euo pipefail

DEST="${1:-.tools/cuda}"
VERSION="${CUDA_WHEEL_VERSION:-12.9.*}"
mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"

nvrtc_dir="$DEST/nvidia/cuda_nvrtc/lib"
ptxas="$DEST/nvidia/cuda_nvcc/bin/ptxas"
runtime_inc="$DEST/nvidia/cuda_runtime/include"

if [[ -e "$nvrtc_dir/libnvrtc.so.12" && -x "$ptxas" && -d "$runtime_inc" ]]; then
    echo "CUDA wheels already installed in $DEST" >&2
else
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --upgrade \
        --target "$DEST" \
        "nvidia-cuda-nvrtc-cu12==${VERSION}" \
        "nvidia-cuda-runtime-cu12==${VERSION}" \
        "nvidia-cuda-nvcc-cu12==${VERSION}" >&2
fi

if [[ ! -e "$nvrtc_dir/libnvrtc.so.12" ]]; then
    echo "error: $nvrtc_dir/libnvrtc.so.12 missing after install" >&2
    exit 1
fi
if [[ ! -x "$ptxas" ]]; then
    # Some wheel versions lose the executable bit.
    chmod +x "$ptxas" 2>/dev/null || true
fi
if [[ ! -x "$ptxas" ]]; then
    echo "error: ptxas missing at $ptxas" >&2
    exit 1
fi

# cudarc's loader tries libnvrtc.so, libnvrtc.so.12, ... (cudarc::get_lib_name_candidates); the wheel
# ships libnvrtc.so.12 (found as is) and libnvrtc-builtins.so.12.x, which libnvrtc dlopens by its
# own name. The unversioned link makes plain `dlopen("libnvrtc.so")` work as well.
if [[ ! -e "$nvrtc_dir/libnvrtc.so" ]]; then
    ln -s libnvrtc.so.12 "$nvrtc_dir/libnvrtc.so"
fi

echo "NVRTC_LIB_DIR=$nvrtc_dir"
echo "PTXAS=$ptxas"
