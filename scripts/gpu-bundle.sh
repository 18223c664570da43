#!/usr/bin/env bash
# Builds, here (no GPU needed), everything scripts/gpu-run.sh needs on the GPU machine, which has
# no Rust toolchain and no network, into the ignored folder gpu-bundle/:
#   bin/linattn   the release binary, stripped (validate --full, bench, devices; the CUDA kernels
#                 are compiled at run time by the machine's NVRTC)
#   wheels/       flash-linear-attention (`fla-core`, pure Python; torch, triton and einops are
#                 already on the GPU machine)
#   peers/        the peer scripts of benches/ as they were at this build
#   COMMIT, MANIFEST   what was built from what, with sizes and sha256 sums
# and checks that the folder stays under 60 MiB (the device tool carries at most 64 MiB).
#
# Then, with the device tool: carry `gpu-bundle`, run `scripts/gpu-run.sh` (one call, timeout
# about 560 s). `FLA_CORE_VERSION` pins the wheel (default: the version below).
set -euo pipefail
cd "$(dirname "$0")/.."

BUNDLE=${LINATTN_BUNDLE:-gpu-bundle}
LIMIT_MIB=60
FLA_CORE_VERSION=${FLA_CORE_VERSION:-0.6.0}

echo "== cargo build --release --bin linattn"
cargo build --release --locked --bin linattn

rm -rf "$BUNDLE"
mkdir -p "$BUNDLE/bin" "$BUNDLE/wheels" "$BUNDLE/peers"
cp target/release/linattn "$BUNDLE/bin/linattn"
strip "$BUNDLE/bin/linattn"

echo "== fla-core $FLA_CORE_VERSION (pure Python wheel)"
if ! python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --dest "$BUNDLE/wheels" "fla-core==$FLA_CORE_VERSION"; then
    echo "warning: could not download fla-core; the GPU run will report the flash-linear-attention peer as missing" >&2
fi

cp benches/peers.py benches/peers_attention.py benches/peers_optim.py benches/peers_common.py "$BUNDLE/peers/"

git rev-parse --short HEAD >"$BUNDLE/COMMIT" 2>/dev/null || echo unknown >"$BUNDLE/COMMIT"
if [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]]; then
    sed -i 's/$/ (with uncommitted changes)/' "$BUNDLE/COMMIT"
fi
(
    cd "$BUNDLE"
    {
        echo "built $(date -u +%Y-%m-%dT%H:%MZ) from $(cat COMMIT) on $(uname -m)"
        find . -type f ! -name MANIFEST | sort | while read -r f; do
            printf '%10d  %s  %s\n' "$(stat -c %s "$f")" "$(sha256sum "$f" | cut -c1-16)" "$f"
        done
    } >MANIFEST
)
cat "$BUNDLE/MANIFEST"

bytes=$(du -sb "$BUNDLE" | cut -f1)
mib=$(((bytes + 1048575) / 1048576))
echo "gpu-bundle: $bytes bytes ($mib MiB; limit $LIMIT_MIB MiB)"
if ((bytes > LIMIT_MIB * 1048576)); then
    echo "error: $BUNDLE is larger than $LIMIT_MIB MiB" >&2
    exit 1
fi
