#!/usr/bin/env python3
"""Peers of `linattn bench` on the same shapes, and the side-by-side table.

Times flash-linear-attention's `fla.ops.gla.chunk_gla` (GLA, causal, vector gate) and
FlashAttention (`flash_attn_func` when installed, else PyTorch's
`scaled_dot_product_attention` restricted to the flash backend), causal, forward and
forward+backward, on flash-linear-attention's shape list, with CUDA events, warm-up and medians;
writes the same JSON as `linattn bench --json`, and with `--ours` (or `--run-ours`) writes the
comparison table to benches/RESULTS_linear_cuda.md (linked from benches/RESULTS.md).

One command on a GPU machine (from the repository root):

    python3 benches/peers.py --run-ours

runs `cargo run --release -- bench --json benches/linattn.json`, times the peers into
benches/peers.json and writes benches/RESULTS_linear_cuda.md. Needs torch with CUDA, flash-linear-attention
(`pip install flash-linear-attention`), optionally flash-attn.

Inputs (as flash-linear-attention's benchmarks): q, k, v, do ~ N(0, 1) in bf16 with layout
[B, T, H, D]; gates `logsigmoid(randn).clamp_min(-5)` of shape [B, T, H, D] (dtype --gate-dtype,
bf16 by default as fla takes it; linattn reads f32 gates); scale D^-0.5; no initial or final state.
"""

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys

SHAPES = [
    (1, 8192, 96, 128),
    (2, 16384, 16, 128),
    (4, 2048, 16, 128),
    (4, 4096, 64, 128),
    (8, 1024, 8, 64),
    (8, 2048, 32, 256),
]

# Dense bf16 tensor-core peaks (TFLOP/s), as in src/cli/bench.rs.
PEAKS = [("GB200", 2500.0), ("B200", 2250.0), ("H200", 989.4), ("H100 PCIE", 756.0),
         ("H100 NVL", 835.0), ("H100", 989.4), ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0)]


def label(shape):
    b, t, h, d = shape
    return f"B{b}-T{t}-H{h}-D{d}"


def peak_of(device):
    d = device.upper()
    for key, value in PEAKS:
        if key in d:
            return value
    return None


def linear_flops(b, t, h, d, chunk=64):
    """Chunked linear attention, the model of src/cli/bench.rs: fwd B H (4 T K V + T C (K + V)),
    fwd+bwd three times that."""
    fwd = b * h * (4.0 * t * d * d + t * chunk * (2.0 * d))
    return fwd, 3.0 * fwd


def attention_flops(b, t, h, d):
    """Causal softmax attention (FlashAttention's convention): fwd 4 B H T^2 D / 2, fwd+bwd 3.5x."""
    fwd = 4.0 * b * h * t * t * d / 2.0
    return fwd, 3.5 * fwd


def time_ms(torch, fn, warmup, iters):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_fla(torch, shape, args):
    import torch.nn.functional as F
    from fla.ops.gla import chunk_gla

    b, t, h, d = shape
    dtype = getattr(torch, args.dtype)
    gdtype = getattr(torch, args.gate_dtype)
    dev = "cuda"
    q = torch.randn(b, t, h, d, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(b, t, h, d, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(b, t, h, d, device=dev, dtype=dtype, requires_grad=True)
    g = F.logsigmoid(torch.randn(b, t, h, d, device=dev, dtype=torch.float32)).clamp_min(-5).to(gdtype)
    g.requires_grad_(True)
    do = torch.randn(b, t, h, d, device=dev, dtype=dtype)

    def call():
        # Older fla versions default to head_first=True; pass the layout explicitly when accepted.
        try:
            return chunk_gla(q, k, v, g, scale=d ** -0.5, head_first=False)[0]
        except TypeError:
            return chunk_gla(q, k, v, g, scale=d ** -0.5)[0]

    def fwd():
        with torch.no_grad():
            call()

    def fwdbwd():
        o = call()
        o.backward(do)

    return time_ms(torch, fwd, args.warmup, args.iters), time_ms(torch, fwdbwd, args.warmup, args.iters)


def bench_flash(torch, shape, args):
    b, t, h, d = shape
    dtype = getattr(torch, args.dtype)
    dev = "cuda"
    q = torch.randn(b, t, h, d, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(b, t, h, d, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(b, t, h, d, device=dev, dtype=dtype, requires_grad=True)
    do = torch.randn(b, t, h, d, device=dev, dtype=dtype)
    try:
        from flash_attn import flash_attn_func

        impl = "flash-attn"

        def call():
            return flash_attn_func(q, k, v, causal=True)
    except ImportError:
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        impl = "sdpa-flash"
        # SDPA takes [B, H, T, D]; the transposes are views.
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

        def call():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).transpose(1, 2)

    def fwd():
        with torch.no_grad():
            call()

    def fwdbwd():
        o = call()
        o.backward(do)

    return impl, time_ms(torch, fwd, args.warmup, args.iters), time_ms(torch, fwdbwd, args.warmup, args.iters)


def document(impl, device, dtype, peak, model, rows):
    results = []
    for shape, fwd_ms, fwdbwd_ms in rows:
        b, t, h, d = shape
        ff, fb = model(b, t, h, d)
        results.append({
            "shape": label(shape), "B": b, "T": t, "H": h, "D": d,
            "fwd_ms": fwd_ms, "fwdbwd_ms": fwdbwd_ms,
            "fwd_tflops": None if fwd_ms is None else ff / (fwd_ms * 1e-3) / 1e12,
            "fwdbwd_tflops": None if fwdbwd_ms is None else fb / (fwdbwd_ms * 1e-3) / 1e12,
        })
    return {"implementation": impl, "device": device, "dtype": dtype, "peak_tflops": peak,
            "flop_model": "chunked-linear" if model is linear_flops else "causal-attention",
            "results": results}


def run_peers(args):
    import torch

    if not torch.cuda.is_available():
        sys.exit("error: torch sees no CUDA device")
    device = torch.cuda.get_device_name(0)
    peak = args.peak_tflops or peak_of(device)
    shapes = [tuple(int(p[1:]) for p in s.split("-")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    docs = []
    fla_rows, flash_rows, flash_impl = [], [], "flash-attn"
    for shape in shapes:
        try:
            f, fb = bench_fla(torch, shape, args)
        except Exception as e:  # report and go on: one peer failing must not hide the others
            print(f"fla chunk_gla {label(shape)}: {type(e).__name__}: {e}", file=sys.stderr)
            f, fb = None, None
        fla_rows.append((shape, f, fb))
        torch.cuda.empty_cache()
        try:
            flash_impl, f, fb = bench_flash(torch, shape, args)
        except Exception as e:
            print(f"flash attention {label(shape)}: {type(e).__name__}: {e}", file=sys.stderr)
            f, fb = None, None
        flash_rows.append((shape, f, fb))
        torch.cuda.empty_cache()
        print(f"{label(shape)}: fla {fla_rows[-1][1:]} ms, {flash_impl} {flash_rows[-1][1:]} ms", file=sys.stderr)
    docs.append(document("fla-chunk_gla", device, args.dtype, peak, linear_flops, fla_rows))
    docs.append(document(flash_impl, device, args.dtype, peak, attention_flops, flash_rows))
    return docs


def fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def ratio(a, b):
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def write_results(path, ours, peers):
    by_impl = {d["implementation"]: {r["shape"]: r for r in d["results"]} for d in peers}
    fla = by_impl.get("fla-chunk_gla", {})
    flash_name = next((d["implementation"] for d in peers if d["implementation"] != "fla-chunk_gla"), "flash-attn")
    flash = by_impl.get(flash_name, {})
    peak = ours.get("peak_tflops")
    lines = [
        "# Benchmarks: linattn CUDA kernels vs flash-linear-attention and FlashAttention",
        "",
        f"Device: {ours.get('device')}; dtype {ours.get('dtype')}; linattn chunk {ours.get('chunk')}; "
        f"bf16 dense peak {fmt(peak, 1)} TFLOP/s. Medians of CUDA-event timings after warm-up.",
        f"Date: {datetime.date.today().isoformat()}.",
        "Generated by `python3 benches/peers.py --run-ours` (linattn: `linattn bench`; peers: "
        f"`fla.ops.gla.chunk_gla`, `{flash_name}` causal).",
        "",
        "Speed-up = peer time / linattn time (> 1: linattn faster). TFLOP/s: chunked-linear FLOP model",
        "for linattn and fla (fwd `B H (4 T D^2 + 2 T C D)`, fwd+bwd 3x), causal-attention model for",
        "FlashAttention (fwd `2 B H T^2 D`, fwd+bwd 3.5x); % = of the bf16 peak.",
        "",
        "| shape | linattn fwd ms | fla fwd ms | FA fwd ms | linattn fwd+bwd ms | fla fwd+bwd ms | FA fwd+bwd ms "
        "| vs fla (fwd+bwd) | vs FA (fwd+bwd) | linattn fwd+bwd TFLOP/s (% peak) | fla TFLOP/s | FA TFLOP/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in ours["results"]:
        s = r["shape"]
        a, f = fla.get(s, {}), flash.get(s, {})
        pct = "" if peak is None or r.get("fwdbwd_tflops") is None else f" ({100 * r['fwdbwd_tflops'] / peak:.1f}%)"
        lines.append(
            f"| {s} | {fmt(r.get('fwd_ms'))} | {fmt(a.get('fwd_ms'))} | {fmt(f.get('fwd_ms'))} "
            f"| {fmt(r.get('fwdbwd_ms'))} | {fmt(a.get('fwdbwd_ms'))} | {fmt(f.get('fwdbwd_ms'))} "
            f"| {ratio(a.get('fwdbwd_ms'), r.get('fwdbwd_ms'))} | {ratio(f.get('fwdbwd_ms'), r.get('fwdbwd_ms'))} "
            f"| {fmt(r.get('fwdbwd_tflops'), 1)}{pct} | {fmt(a.get('fwdbwd_tflops'), 1)} | {fmt(f.get('fwdbwd_tflops'), 1)} |")
    lines += ["", "Targets (H100, bf16): fwd+bwd >= 1.2x flash-linear-attention on every shape; faster than",
              "FlashAttention-2 from T = 4096 up.", ""]
    with open(path, "w") as fh:
        fh.write("\n".join(lines))
    print(f"wrote {path}", file=sys.stderr)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="", help="comma-separated B1-T8192-H96-D128 labels (default: fla's list)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--gate-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--json", default=os.path.join(here, "peers.json"), help="where the peers' JSON goes")
    ap.add_argument("--ours", default=None, help="JSON of `linattn bench --json` to compare against")
    ap.add_argument("--run-ours", action="store_true",
                    help="first run `cargo run --release -- bench --json benches/linattn.json`")
    ap.add_argument("--results", default=os.path.join(here, "RESULTS_linear_cuda.md"),
                    help="where the table goes (benches/RESULTS.md links to it)")
    args = ap.parse_args()

    ours_path = args.ours
    if args.run_ours:
        ours_path = os.path.join(here, "linattn.json")
        cmd = ["cargo", "run", "--release", "--", "bench", "--json", ours_path,
               "--warmup", str(args.warmup), "--iters", str(args.iters),
               "--dtype", {"bfloat16": "bf16", "float16": "f16"}[args.dtype]]
        if args.shapes:
            cmd += ["--shapes", args.shapes]
        if args.peak_tflops:
            cmd += ["--peak-tflops", str(args.peak_tflops)]
        print("+ " + " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, cwd=root, check=True)

    peers = run_peers(args)
    with open(args.json, "w") as fh:
        json.dump({"documents": peers}, fh, indent=2)
    print(f"wrote {args.json}", file=sys.stderr)
    if ours_path:
        with open(ours_path) as fh:
            ours = json.load(fh)
        write_results(args.results, ours, peers)


if __name__ == "__main__":
    main()
