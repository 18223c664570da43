#!/usr/bin/env bash
# Installs CUDA 13's nvcc toolchain from NVIDIA's PyPI wheels into DEST (default .tools/cuda13), for
# building candle's own CUDA kernels (the `candle-kernels` build script runs nvcc) on a machine
# without a CUDA toolkit or a GPU: linattn-candle's `cuda` feature.
#   nvidia-cuda-nvcc     nvcc, ptxas, fatbinary, nvlink
#   nvidia-nvvm          cicc and libdevice (nvcc's front end)
#   nvidia-cuda-crt      crt headers
#   nvidia-cuda-runtime  cuda_runtime.h, cuda_fp16.h, ..., libcudart
#   nvidia-cuda-cccl     cub / thrust / libcu++ headers
# They share the nvidia/cu13 prefix, which nvcc.profile resolves relative to nvcc itself.
# Idempotent. Prints (last lines, machine-readable):
#   NVCC=<path of nvcc>
#   CUDA_HOME=<toolkit root>
set -euo pipefail

DEST="${1:-.tools/cuda13}"
VERSION="${CUDA13_WHEEL_VERSION:-13.5.*}"
mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"
root="$DEST/nvidia/cu13"
nvcc="$root/bin/nvcc"

if [[ -x "$nvcc" && -x "$root/nvvm/bin/cicc" && -e "$root/include/cuda_runtime.h" && -d "$root/include/cccl" ]]; then
    echo "CUDA 13 nvcc wheels already installed in $DEST" >&2
else
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --upgrade --target "$DEST" \
        "nvidia-cuda-nvcc==${VERSION}" \
        "nvidia-nvvm==${VERSION}" \
        "nvidia-cuda-crt==${VERSION}" \
        "nvidia-cuda-runtime==${VERSION}" \
        "nvidia-cuda-cccl==13.*" >&2
    # Some wheel versions lose the executable bits.
    chmod +x "$root"/bin/* "$root"/nvvm/bin/* 2>/dev/null || true
fi
for f in "$nvcc" "$root/nvvm/bin/cicc" "$root/include/cuda_runtime.h"; do
    if [[ ! -e "$f" ]]; then
        echo "error: $f missing after install" >&2
        exit 1
    fi
done
echo "NVCC=$nvcc"
echo "CUDA_HOME=$root"
