#!/usr/bin/env python3
"""Peers of `linattn bench engine` on the same shapes, and the side-by-side table.

Times flash-linear-attention's `fla.ops.gla.chunk_gla` (GLA, causal, vector gate) and
FlashAttention-2 (`flash_attn_func` when installed, else PyTorch's `scaled_dot_product_attention`
restricted to the flash backend, which runs the FlashAttention-2 kernels), causal, forward and
forward+backward, with CUDA events, warm-up and medians. Writes the peers' JSON (after every
shape, so a run cut short keeps what it measured) and, with `--ours`, the table.

On the GPU machine `scripts/gpu-run.sh` runs it after the carried binary:

    linattn bench engine --json OUT/engine_linattn.json
    python3 benches/peers.py --ours OUT/engine_linattn.json --json OUT/engine_peers.json --table OUT/engine.md

With cargo on a GPU machine, `--run-ours` runs `cargo run --release -- bench engine` first.
Inputs (as flash-linear-attention's benchmarks): q, k, v, do ~ N(0, 1) in bf16, layout
[B, T, H, D]; gates `logsigmoid(randn).clamp_min(-5)` [B, T, H, D] (`--gate-dtype`, bf16 by
default as fla takes it; linattn reads f32 gates); scale D^-0.5; no initial or final state.
"""

import argparse
import inspect
import os
import subprocess
import sys

import peers_common as pc

SHAPES = [
    (1, 8192, 96, 128),
    (2, 16384, 16, 128),
    (4, 2048, 16, 128),
    (4, 4096, 64, 128),
    (8, 1024, 8, 64),
    (8, 2048, 32, 256),
]


def label(shape):
    b, t, h, d = shape
    return f"B{b}-T{t}-H{h}-D{d}"


def parse_shape(s):
    return tuple(int(p[1:]) for p in s.split("-"))


def linear_flops(b, t, h, d, chunk=64):
    """Chunked linear attention, the model of src/cli/bench/engine.rs: fwd B H (4 T K V + T C (K + V)),
    fwd+bwd three times that."""
    fwd = b * h * (4.0 * t * d * d + t * chunk * (2.0 * d))
    return fwd, 3.0 * fwd


def attention_flops(b, t, h, d):
    """Causal softmax attention (FlashAttention's convention): fwd 4 B H T^2 D / 2, fwd+bwd 3.5x."""
    fwd = 4.0 * b * h * t * t * d / 2.0
    return fwd, 3.5 * fwd


def bench_fla(torch, shape, args):
    import torch.nn.functional as F  # noqa: PLC0415
    from fla.ops.gla import chunk_gla  # noqa: PLC0415

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
    # Older fla versions default to head_first=True; newer ones have no such argument.
    extra = {"head_first": False} if "head_first" in inspect.signature(chunk_gla).parameters else {}

    def call():
        return chunk_gla(q, k, v, g, scale=d ** -0.5, **extra)[0]

    def fwd():
        with torch.no_grad():
            call()

    def fwdbwd():
        call().backward(do)

    return pc.time_ms(torch, fwd, args.warmup, args.iters), pc.time_ms(torch, fwdbwd, args.warmup, args.iters)


def bench_flash(torch, shape, args):
    b, t, h, d = shape
    dtype = getattr(torch, args.dtype)
    dev = "cuda"
    q = torch.randn(b, t, h, d, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(b, t, h, d, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(b, t, h, d, device=dev, dtype=dtype, requires_grad=True)
    do = torch.randn(b, t, h, d, device=dev, dtype=dtype)
    try:
        from flash_attn import flash_attn_func  # noqa: PLC0415

        impl = "flash_attn_func"

        def call():
            return flash_attn_func(q, k, v, causal=True)
    except ImportError:
        import torch.nn.functional as F  # noqa: PLC0415
        from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415

        impl = "torch_sdpa_flash"
        # SDPA takes [B, H, T, D]; the transposes are views.
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

        def call():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).transpose(1, 2)

    def fwd():
        with torch.no_grad():
            call()

    def fwdbwd():
        call().backward(do)

    return impl, pc.time_ms(torch, fwd, args.warmup, args.iters), pc.time_ms(torch, fwdbwd, args.warmup, args.iters)


def row(shape, name, model, timings):
    b, t, h, d = shape
    ff, fb = model(b, t, h, d)
    (fwd, fwd_min), (fb_ms, fb_min) = timings
    return {
        "impl": name, "shape": label(shape), "B": b, "T": t, "H": h, "D": d,
        "fwd_ms": fwd, "fwd_ms_min": fwd_min, "fwdbwd_ms": fb_ms, "fwdbwd_ms_min": fb_min,
        "fwd_tflops": ff / (fwd * 1e-3) / 1e12, "fwdbwd_tflops": fb / (fb_ms * 1e-3) / 1e12,
    }


def run_peers(torch, shapes, args):
    """Times both peers on every shape while the budget lasts; the JSON is rewritten after each."""
    doc = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "results": [], "errors": []}
    try:
        import fla  # noqa: PLC0415

        doc["fla"] = getattr(fla, "__version__", "?")
    except ImportError as e:
        doc["errors"].append(f"fla: {e}")
    budget = pc.Budget(args.budget_s)
    for shape in shapes:
        if not budget.left():
            doc["errors"].append(f"{label(shape)}: not timed (time budget of {args.budget_s} s spent)")
            continue
        for name, fn in (("fla_chunk_gla", bench_fla), ("flash", bench_flash)):
            try:
                if name == "flash":
                    impl, *timings = fn(torch, shape, args)
                    doc["results"].append(row(shape, impl, attention_flops, timings))
                else:
                    doc["results"].append(row(shape, name, linear_flops, fn(torch, shape, args)))
                r = doc["results"][-1]
                print(f"{label(shape)} {r['impl']}: fwd {r['fwd_ms']:.3f} ms, fwd+bwd {r['fwdbwd_ms']:.3f} ms",
                      file=sys.stderr)
            except Exception as e:  # one peer failing must not hide the other
                doc["errors"].append(f"{name} {label(shape)}: {type(e).__name__}: {e}")
                print(doc["errors"][-1], file=sys.stderr)
            torch.cuda.empty_cache()
        pc.write_json(args.json, doc)
    return doc


def table(ours, peers, skipped):
    rows = {}
    for r in (peers or {}).get("results", []):
        rows[(r["shape"], "fla" if r["impl"].startswith("fla") else "flash")] = r
    flash_name = next((r["impl"] for r in (peers or {}).get("results", []) if not r["impl"].startswith("fla")),
                      "FlashAttention-2")
    peak = ours.get("peak_tflops")
    lines = pc.header_lines(
        "GLA engine: linattn vs flash-linear-attention and FlashAttention-2",
        ours,
        skipped or f"`fla.ops.gla.chunk_gla` (fla {peers.get('fla', '?')}), `{flash_name}` causal"
        f" (torch {peers.get('torch')})",
    )
    lines += [
        f"{ours.get('dtype')} inputs, linattn chunk {ours.get('chunk')}, causal, vector gates; "
        f"{pc.timing_note(ours)}. Speed-up = peer time / linattn time (> 1: linattn faster).",
        "TFLOP/s: the chunked-linear FLOP model for linattn and fla (fwd `B H (4 T D^2 + 2 T C D)`,"
        " fwd+bwd 3x), the causal-attention model for FlashAttention (fwd `2 B H T^2 D`, fwd+bwd 3.5x);"
        " % = of the bf16 peak.",
        "",
        "| shape | linattn fwd ms | fla fwd ms | FA2 fwd ms | linattn fwd+bwd ms | fla fwd+bwd ms |"
        " FA2 fwd+bwd ms | speed-up vs fla (fwd+bwd) | vs FA2 (fwd+bwd) | linattn fwd+bwd TFLOP/s |"
        " fla TFLOP/s | FA2 TFLOP/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in ours["results"]:
        s = r["shape"]
        a, f = rows.get((s, "fla"), {}), rows.get((s, "flash"), {})
        lines.append(
            f"| {s} | {pc.fmt(r.get('fwd_ms'))} | {pc.fmt(a.get('fwd_ms'))} | {pc.fmt(f.get('fwd_ms'))}"
            f" | {pc.fmt(r.get('fwdbwd_ms'))} | {pc.fmt(a.get('fwdbwd_ms'))} | {pc.fmt(f.get('fwdbwd_ms'))}"
            f" | {pc.ratio(a.get('fwdbwd_ms'), r.get('fwdbwd_ms'))} | {pc.ratio(f.get('fwdbwd_ms'), r.get('fwdbwd_ms'))}"
            f" | {pc.fmt(r.get('fwdbwd_tflops'), '{:.1f}')}{pc.pct(r.get('fwdbwd_tflops'), peak)}"
            f" | {pc.fmt(a.get('fwdbwd_tflops'), '{:.1f}')} | {pc.fmt(f.get('fwdbwd_tflops'), '{:.1f}')} |"
        )
    for e in (peers or {}).get("errors", []):
        lines.append(f"\nPeer error: {e}")
    lines += ["", "Targets: fwd+bwd >= 1.2x flash-linear-attention on every shape; faster than FlashAttention-2"
              " from T = 4096 up.", ""]
    return "\n".join(lines)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="", help="comma-separated B1-T8192-H96-D128 labels (default: those of --ours)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--gate-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=None, help="start no new shape after this many seconds")
    ap.add_argument("--json", default=os.path.join(here, "engine_peers.json"), help="where the peers' JSON goes")
    ap.add_argument("--ours", default=None, help="JSON of `linattn bench engine --json` to compare against")
    
    ap.add_argument("--run-ours", action="store_true", help="first run `cargo run --release -- bench engine`")
    ap.add_argument("--no-run", action="store_true", help="time nothing: the table from the JSON of --json")
    ap.add_argument("--table", default=os.path.join(here, "RESULTS_linear_cuda.md"), help="where the table goes")
    args = ap.parse_args()

    if args.run_ours:
        args.ours = args.ours or os.path.join(here, "engine_linattn.json")
        cmd = ["cargo", "run", "--release", "--", "bench", "engine", "--json", args.ours,
               "--warmup", str(args.warmup), "--iters", str(args.iters),
               "--dtype", {"bfloat16": "bf16", "float16": "f16"}[args.dtype]]
        if args.shapes:
            cmd += ["--shapes", args.shapes]
        print("+ " + " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, cwd=os.path.dirname(here), check=True)
    ours = pc.load_json(args.ours)
    if args.shapes:
        shapes = [parse_shape(s) for s in args.shapes.split(",")]
    elif ours:
        shapes = [(r["B"], r["T"], r["H"], r["D"]) for r in ours["results"]]
    else:
        shapes = SHAPES

    torch, why = (None, "--no-run") if args.no_run else pc.load_torch()
    peers = pc.load_json(args.json) if args.no_run else None
    if torch is None and peers is None:
        print(f"skipped: peers (fla chunk_gla, FlashAttention-2): {why}")
    elif torch is not None:
        peers = run_peers(torch, shapes, args)
    if ours:
        pc.write_text(args.table, table(ours, peers, None if peers else f"not run ({why})"))
    elif args.ours:
        print(f"no linattn results at {args.ours}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
