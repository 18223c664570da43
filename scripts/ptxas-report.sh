#!/usr/bin/env bash
# Registers / spills / shared memory of every CUDA kernel variant, without a GPU.
#
#   scripts/ptxas-report.sh [DEST]      (DEST: where the CUDA wheels live, default .tools/cuda)
#
# 1. installs (or finds) libnvrtc and ptxas from the NVIDIA wheels (scripts/install-cuda-wheels.sh),
# 2. compiles every variant for sm_80 and sm_90 with NVRTC through the compile test, which writes
#    the PTX to a temporary folder (LINATTN_PTX_DIR),
# 3. runs `ptxas -v` on each PTX and writes kernels/RESOURCES.md: per kernel registers, spill
#    stores/loads, stack frame, static and dynamic shared memory (the latter from la_smem_table),
# 4. exits non-zero when any hot kernel spills: linear_chunk.cu (the chunk forward/backward),
#    attention.cu (block-sparse FlashAttention forward/backward) and optim.cu (the fused optimizer
#    step and WSM merging).
# With LINATTN_PTX_DIR set to a folder of PTX from an earlier compile-test run, step 2 is skipped.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/.tools/cuda}"
cd "$ROOT"

paths="$(scripts/install-cuda-wheels.sh "$DEST")"
NVRTC_LIB_DIR="$(sed -n 's/^NVRTC_LIB_DIR=//p' <<<"$paths")"
PTXAS="$(sed -n 's/^PTXAS=//p' <<<"$paths")"

# LINATTN_PTX_DIR pointing at a folder that already holds the PTX (written by an earlier run of
# the compile test with the same variable) skips the compile step.
if [[ -n "${LINATTN_PTX_DIR:-}" ]] && compgen -G "$LINATTN_PTX_DIR/*.ptx" >/dev/null; then
    PTX_DIR="$(mktemp -d)"
    cp "$LINATTN_PTX_DIR"/*.ptx "$PTX_DIR"/
    echo "using the PTX in $LINATTN_PTX_DIR" >&2
else
    PTX_DIR="$(mktemp -d)"
    echo "compiling every kernel variant to PTX (NVRTC from $NVRTC_LIB_DIR)" >&2
    LD_LIBRARY_PATH="$NVRTC_LIB_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" LINATTN_PTX_DIR="$PTX_DIR" \
        cargo test --quiet --test cuda_compile --test cuda_attention_compile every_ -- --nocapture >&2
fi
trap 'rm -rf "$PTX_DIR"' EXIT

shopt -s nullglob
ptx_files=("$PTX_DIR"/*.ptx)
if [[ ${#ptx_files[@]} -eq 0 ]]; then
    echo "error: no PTX was written (was libnvrtc found?)" >&2
    exit 1
fi

LOG_DIR="$PTX_DIR/logs"
mkdir -p "$LOG_DIR"
# One ptxas per PTX file, as many at once as there are cores (ptxas itself is single-threaded).
export PTXAS LOG_DIR
printf '%s\0' "${ptx_files[@]}" | xargs -0 -n 1 -P "$(nproc)" bash -c '
    f="$1"; base="$(basename "$f" .ptx)"; arch="${base%%__*}"
    "$PTXAS" -v -arch="$arch" "$f" -o /dev/null 2>"$LOG_DIR/$base.log" || {
        cat "$LOG_DIR/$base.log" >&2
        echo "error: ptxas failed on $base" >&2
        exit 255
    }' _ || { echo "error: ptxas failed" >&2; exit 1; }

python3 - "$PTX_DIR" "$LOG_DIR" "$ROOT/kernels/RESOURCES.md" "$("$PTXAS" --version | tail -1)" <<'PY'
import os, re, sys

ptx_dir, log_dir, out_path, ptxas_version = sys.argv[1:5]

# Dynamic shared memory slots of linear_chunk.cu (kernel name -> index in la_smem_table).
CHUNK_SLOTS = {"la_states": 1, "la_dstates": 2, "la_intra_A": 3, "la_fwd_o": 4, "la_bwd_dv": 5,
               "la_bwd_dA": 6, "la_bwd_dqk_intra": 7, "la_bwd_dqkg": 8}
# ... and of attention.cu (KERNELS in src/attention/cuda/kernels.rs).
ATTN_SLOTS = {"attn_fwd": 0, "attn_bwd_dq": 1, "attn_bwd_dkdv": 2}
HOT = ("linear_chunk", "attention", "optim")

def smem_table(ptx):
    m = re.search(r"la_smem_table\[(\d+)\]\s*=\s*\{([^}]*)\}", ptx)
    if not m:
        return None
    vals = [int(x) for x in m.group(2).replace(" ", "").split(",") if x]
    n = int(m.group(1))
    if ".b8 la_smem_table" in m.group(0) or ".b8" in ptx[max(0, m.start() - 40):m.start()]:
        # .b8 bytes, little endian; trailing zero bytes are omitted from the initializer.
        vals += [0] * (n - len(vals))
        return [vals[i] | vals[i + 1] << 8 | vals[i + 2] << 16 | vals[i + 3] << 24 for i in range(0, n, 4)]
    return vals + [0] * (n - len(vals))  # .b32 words

rows = []  # (arch, variant, kernel, regs, spill_st, spill_ld, stack, static_smem, dyn_smem)
for name in sorted(os.listdir(log_dir)):
    base = name[:-4]
    arch, variant = base.split("__", 1)
    ptx = open(os.path.join(ptx_dir, base + ".ptx")).read()
    slots = CHUNK_SLOTS if variant.startswith("linear_chunk") else ATTN_SLOTS if variant.startswith("attention") else {}
    table = smem_table(ptx) if slots else None
    log = open(os.path.join(log_dir, name)).read()
    for block in re.split(r"(?=ptxas info\s*: Compiling entry function)", log):
        m = re.search(r"Compiling entry function '(\w+)'", block)
        if not m:
            continue
        kernel = m.group(1)
        regs = int(re.search(r"Used (\d+) registers", block).group(1))
        stack, st, ld = map(int, re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", block).groups())
        sm = re.search(r"(\d+) bytes smem", block)
        static_smem = int(sm.group(1)) if sm else 0
        dyn = table[slots[kernel]] if table and kernel in slots else 0
        rows.append((arch, variant, kernel, regs, st, ld, stack, static_smem, dyn))

def pretty_variant(v):
    v = v.replace("linear_", "").replace(".cu", "").replace("ATT_", "")
    v = v.replace("LA_DTYPE=0", "bf16").replace("LA_DTYPE=1", "f16").replace("LA_DTYPE=2", "f32")
    v = v.replace("LA_GATE_VEC=1", "vector gate").replace("LA_GATE_VEC=0", "scalar gate").replace("LA_BT=", "BT ")
    return v.replace("_", " ").strip()

spills = [r for r in rows if r[1].startswith(HOT) and (r[4] or r[5])]
lines = [
    "# Kernel resources",
    "",
    "Generated by `scripts/ptxas-report.sh` (do not edit): every variant compiled by NVRTC, then",
    f"`ptxas -v` ({ptxas_version}). Registers per thread, spill stores/loads and stack frame",
    "in bytes per thread, static and dynamic shared memory in bytes per block (dynamic: the kernel's",
    "entry of `la_smem_table`; above 48 KiB the host opts in per function). CI fails on any spill in",
    "the hot kernels: the chunk kernels (`linear_chunk.cu`), the attention kernels (`attention.cu`)",
    "and the fused optimizer kernels (`optim.cu`).",
    "",
    f"Kernels: {len(rows)} (arch, variant, kernel) triples; spills in hot kernels: {len(spills)}.",
    "",
]
for arch in sorted({r[0] for r in rows}):
    lines += [f"## {arch}", "", "| variant | kernel | regs | spill st/ld | stack | smem static | smem dynamic |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for r in sorted((r for r in rows if r[0] == arch), key=lambda r: (r[1], r[2])):
        lines.append(f"| {pretty_variant(r[1])} | `{r[2]}` | {r[3]} | {r[4]}/{r[5]} | {r[6]} | {r[7]} | {r[8]} |")
    lines.append("")
open(out_path, "w").write("\n".join(lines))
print(f"wrote {out_path}: {len(rows)} kernels", file=sys.stderr)
if spills:
    for r in spills:
        print(f"SPILL: {r[0]} {r[1]} {r[2]}: {r[4]} bytes stores, {r[5]} bytes loads", file=sys.stderr)
    sys.exit(1)
PY
