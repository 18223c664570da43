#!/usr/bin/env bash
# The whole GPU check in one call on the device machine (no Rust toolchain, no network), from the
# repository root with gpu-bundle/ carried (scripts/gpu-bundle.sh builds it here):
#
#     scripts/gpu-run.sh              # on the GPU machine: results in $OUT (default ./gpu-out)
#     scripts/gpu-run.sh --dry-run    # here, on the CPU: the same logic on cube/cpu, tiny shapes
#
# Phases, in order, each with its own time budget (seconds) and each writing its results to $OUT
# as soon as it ends, so a run cut short still returns what it measured:
#   1. device      nvidia-smi (name, clocks, driver), `linattn devices`
#   2. validate    `linattn validate --device cuda --full`: the matrix and every GPU test suite
#                  against the f64 reference (must pass)
#   3. sanitizer   compute-sanitizer memcheck over a small validation run, racecheck over the
#                  attention and chunkwise engine kernels
#   4. bench       `linattn bench engine|attention|optim`, each followed by its peer on the same
#                  shapes (fla.ops.gla.chunk_gla from the carried wheel and FlashAttention-2 through
#                  torch SDPA; SDPA flash; torch.optim.AdamW(fused=True) and a device copy)
#   5. tables      the side-by-side tables (ratios, TFLOP/s and GB/s against the device's peaks)
# $OUT holds at most 7 files (the device tool brings back 8): summary.md (the phase table and every
# table), device.txt, validate.txt, sanitizer.txt, bench.txt (logs), tables.md, bench.json (every
# raw result). Scratch files go to a temporary folder.
#
# The exit status is 0 when every phase that ran passed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h | --help) sed -n '2,23p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg" >&2; exit 2 ;;
    esac
done

BUNDLE=${LINATTN_BUNDLE:-$ROOT/gpu-bundle}
OUT=${OUT:-$ROOT/gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
BIN=$BUNDLE/bin/linattn
# The peer scripts as they were when the bundle was built (else this checkout's).
PEERS=$BUNDLE/peers
[[ -f $PEERS/peers.py ]] || PEERS=$ROOT/benches
SUMMARY=$OUT/summary.md
STARTED=$SECONDS
FAILED=0

# The Python that has torch on the device machine; plain python3 elsewhere.
PY=python3
for candidate in /opt/torch/.venv/bin/python3; do
    [[ -x $candidate ]] && PY=$candidate
done

note() { echo "[gpu-run +$((SECONDS - STARTED))s] $*"; }

# One row per phase in summary.md: name, status, seconds, where its output is.
{
    echo "# linattn GPU run ($( ((DRY)) && echo "dry run on the CPU" || echo "device machine"))"
    echo
    echo "Date: $(date -u +%Y-%m-%dT%H:%MZ). Commit: $(cat "$BUNDLE/COMMIT" 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo unknown)."
    echo
    echo "| phase | status | seconds | output |"
    echo "|---|---|---:|---|"
} >"$SUMMARY"
PHASE_ROWS=$WORK/phase-rows
: >"$PHASE_ROWS"

# phase NAME BUDGET_S LOGFILE CMD...: runs CMD under `timeout`, appending its output to LOGFILE;
# records ok / FAIL (rc) / TIMEOUT in summary.md.
phase() {
    local name=$1 budget=$2 log=$3
    shift 3
    local t0=$SECONDS rc
    note "$name (budget ${budget}s): $*"
    echo "### $name: $* (budget ${budget}s)" >>"$log"
    timeout --kill-after=10 "$budget" "$@" >>"$log" 2>&1
    rc=$?
    local status=ok
    if ((rc == 124 || rc == 137)); then
        status="TIMEOUT after ${budget}s"
        FAILED=1
    elif ((rc != 0)); then
        status="FAIL (exit $rc)"
        FAILED=1
    fi
    echo "| $name | $status | $((SECONDS - t0)) | $(basename "$log") |" >>"$PHASE_ROWS"
    note "$name: $status"
    write_summary
    return $rc
}

# summary.md = header + phase table + the tables produced so far.
write_summary() {
    local head
    head=$(sed -n '1,/^|---|---|---:|---|$/p' "$SUMMARY")
    {
        echo "$head"
        cat "$PHASE_ROWS"
        echo
        [[ -s $OUT/tables.md ]] && cat "$OUT/tables.md"
        [[ -s $OUT/validate.txt ]] && {
            echo
            echo "Validation: $(grep -E '^[0-9]+ rows, ' "$OUT/validate.txt" | tail -1)"
        }
    } >"$SUMMARY.tmp" && mv "$SUMMARY.tmp" "$SUMMARY"
}

skip() {
    echo "| $1 | skipped: $2 | 0 | - |" >>"$PHASE_ROWS"
    note "skipped: $1: $2"
    write_summary
}

if [[ ! -x $BIN ]]; then
    echo "error: $BIN missing: run scripts/gpu-bundle.sh first (and carry gpu-bundle/)" >&2
    exit 2
fi

# ---- libnvrtc: the bundle carries none; use the machine's (the torch venv's CUDA 13 wheel, or the
# toolkit). linattn loads $LINATTN_NVRTC_DIR first.
find_nvrtc() {
    local roots=()
    local site
    site=$("$PY" -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null) || site=
    for s in $site; do roots+=("$s/nvidia"); done
    roots+=(/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-*/lib64 "$ROOT/.tools/cuda/nvidia")
    local lib
    lib=$(find "${roots[@]}" -maxdepth 4 -name 'libnvrtc.so.1[0-9]*' ! -name '*builtins*' 2>/dev/null | sort -V | tail -1)
    [[ -n $lib ]] && dirname "$lib"
}
if [[ -z ${LINATTN_NVRTC_DIR:-} ]]; then
    LINATTN_NVRTC_DIR=$(find_nvrtc)
fi
if [[ -n ${LINATTN_NVRTC_DIR:-} ]]; then
    export LINATTN_NVRTC_DIR
    export LD_LIBRARY_PATH=$LINATTN_NVRTC_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    note "libnvrtc: $LINATTN_NVRTC_DIR"
else
    note "libnvrtc: not found (the cuda backend will say so)"
fi

# ---- The fla wheel, installed into a scratch folder (pure Python, no dependencies beyond what
# the venv has: torch, triton, einops).
if compgen -G "$BUNDLE/wheels/*.whl" >/dev/null; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$BUNDLE"/wheels/*.whl >"$WORK/pip.log" 2>&1; then
        export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
    else
        note "pip could not install the carried wheels: $(tail -1 "$WORK/pip.log")"
    fi
fi
export PYTHONUNBUFFERED=1
# Kernels compiled once (by the validation, on all cores) are reused by the later processes.
export LINATTN_KERNEL_CACHE=${LINATTN_KERNEL_CACHE:-$WORK/kernels}

# ---- Phase sizes: the GPU run, or tiny shapes on the CPU.
if ((DRY)); then
    VALIDATE=(validate --device auto --quick)
    SANITIZE=()
    ENGINE=(bench engine --device cube --dtype f32 --shapes B1-T128-H2-D32 --warmup 1 --iters 2)
    ATTENTION=(bench attention --device cube --dtype f32 --seqs 256 --tokens-per-frame 64 --heads 1 --head-dim 32 --warmup 1 --iters 2)
    OPTIM=(bench optim --device cube --params 100000 --tensors 20 --warmup 1 --iters 2)
    BUDGETS=(device=30 validate=300 memcheck=1 racecheck=1 engine=120 attention=120 optim=120)
else
    VALIDATE=(validate --device cuda --full)
    SANITIZE=(validate --device cuda --quick --ops gla,lion-s,attention-sparse,adamw)
    RACE=(validate --device cuda --quick --ops gla,attention-dense,attention-sparse)
    ENGINE=(bench engine --device cuda)
    ATTENTION=(bench attention --device cuda)
    OPTIM=(bench optim --device cuda)
    BUDGETS=(device=20 validate=210 memcheck=60 racecheck=45 engine=110 attention=60 optim=30)
fi
budget() {
    local kv
    for kv in "${BUDGETS[@]}"; do [[ ${kv%%=*} == "$1" ]] && echo "${kv#*=}"; done
}

# ---- 1. device
{
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,temperature.gpu --format=csv
    else
        echo "nvidia-smi: not found (no NVIDIA driver on this machine)"
    fi
    echo
    uname -a
    nproc
} >"$OUT/device.txt" 2>&1
phase device "$(budget device)" "$OUT/device.txt" "$BIN" devices

# ---- 2. validation (must pass)
phase validate "$(budget validate)" "$OUT/validate.txt" "$BIN" "${VALIDATE[@]}"

# ---- 3. compute-sanitizer
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if ((DRY)); then
    skip memcheck "dry run (no GPU)"
    skip racecheck "dry run (no GPU)"
elif [[ -z $SANITIZER ]]; then
    skip memcheck "compute-sanitizer not found"
    skip racecheck "compute-sanitizer not found"
else
    phase memcheck "$(budget memcheck)" "$OUT/sanitizer.txt" \
        "$SANITIZER" --tool memcheck --error-exitcode 3 --print-limit 20 "$BIN" "${SANITIZE[@]}"
    phase racecheck "$(budget racecheck)" "$OUT/sanitizer.txt" \
        "$SANITIZER" --tool racecheck --error-exitcode 3 --print-limit 20 "$BIN" "${RACE[@]}"
fi

# ---- 4 + 5. benchmarks, each followed by its peer and its table
# bench.json gathers every raw result ({"engine": {"linattn": .., "peers": ..}, ...}).
merge_json() {
    "$PY" - "$WORK" "$OUT/bench.json" <<'EOF'
import json, os, sys
work, out = sys.argv[1], sys.argv[2]
doc = {}
for what in ("engine", "attention", "optim"):
    for side in ("linattn", "peers"):
        path = os.path.join(work, f"{what}_{side}.json")
        if os.path.exists(path):
            with open(path) as f:
                doc.setdefault(what, {})[side] = json.load(f)
with open(out + ".tmp", "w") as f:
    json.dump(doc, f, indent=1)
os.replace(out + ".tmp", out)
EOF
}
# bench_phase WHAT PEER_SCRIPT LINATTN_ARGS...: ours, then the peer with what is left of the budget
# (the peer stops starting new shapes 10 s before), then the table (rebuilt from the saved JSON if
# the peer was cut short).
bench_phase() {
    local what=$1 script=$2
    shift 2
    local total t0=$SECONDS left
    total=$(budget "$what")
    phase "$what" "$total" "$OUT/bench.txt" "$BIN" "$@" --json "$WORK/${what}_linattn.json"
    merge_json
    if [[ ! -s $WORK/${what}_linattn.json ]]; then
        skip "$what-peer" "no linattn results"
        return
    fi
    left=$((total - (SECONDS - t0)))
    ((left < 20)) && left=20
    local peer=("$PY" "$PEERS/$script" --ours "$WORK/${what}_linattn.json" --json "$WORK/${what}_peers.json" --table "$WORK/${what}.md")
    [[ $script != peers_optim.py ]] && peer+=(--budget-s $((left - 15)))
    if ! phase "$what-peer" "$left" "$OUT/bench.txt" "${peer[@]}"; then
        # Cut short or failed: the table from what was saved.
        "${peer[@]}" --no-run >>"$OUT/bench.txt" 2>&1 || true
    fi
    merge_json
    if [[ -s $WORK/${what}.md ]]; then
        {
            cat "$WORK/${what}.md"
            echo
        } >>"$OUT/tables.md"
    else
        echo "| $what-table | FAIL: no table | 0 | - |" >>"$PHASE_ROWS"
        FAILED=1
    fi
    write_summary
}
: >"$OUT/tables.md"
bench_phase engine peers.py "${ENGINE[@]}"
bench_phase attention peers_attention.py "${ATTENTION[@]}"
bench_phase optim peers_optim.py "${OPTIM[@]}"

write_summary
note "done in $((SECONDS - STARTED)) s; results in $OUT"
echo
cat "$SUMMARY"
exit $FAILED
