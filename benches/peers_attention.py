#!/usr/bin/env python3
"""Dense FlashAttention-2 on the shapes of benches/cuda_attention.rs, and the side-by-side table.

Times `flash_attn_func` (flash-attn, when installed) or else PyTorch's
`scaled_dot_product_attention` restricted to the flash backend: bf16, B = 1, H = 24, D = 128,
non-causal, sequence lengths 16K, 64K and 115,200, forward and backward (the backward alone,
from a stored forward, as linattn's backward launch), with CUDA events around every iteration
after a warm-up, medians. Writes the JSON schema of `cargo bench --bench cuda_attention`.

One command on a GPU machine (from the repository root):

    python3 benches/peers_attention.py --run-ours

runs `cargo bench --bench cuda_attention -- --json benches/attention_linattn.json` (linattn dense
and Radial-sparse, forward and backward), times the peer into benches/attention_peers.json, and
prints (and writes to benches/RESULTS_attention.md) the table with the two targets:
  - dense: linattn throughput >= 0.9x FlashAttention-2 (time ratio FA2 / linattn >= 0.9);
  - sparse: linattn sparse time <= 1.2x (linattn dense time x block density).
Without `--run-ours`, `--ours PATH` compares an existing linattn JSON.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

SEQS = [16384, 65536, 115200]
HEADS = 24
HEAD_DIM = 128


def peer_fns(torch):
    """(name, forward(q, k, v) -> out) with q, k, v [B, T, H, D]."""
    try:
        from flash_attn import flash_attn_func  # noqa: PLC0415

        return "flash_attn_func", lambda q, k, v: flash_attn_func(q, k, v, causal=False)
    except ImportError:
        pass
    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415

    def sdpa(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=False
            )
        return out.transpose(1, 2)

    return "torch_sdpa_flash", sdpa


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
    times.sort()
    return times[len(times) // 2], times[0]


def run_peers(args):
    import torch  # noqa: PLC0415

    if not torch.cuda.is_available():
        print("skipped: no CUDA device (torch.cuda.is_available() is false)")
        return None
    name, fwd = peer_fns(torch)
    device = torch.cuda.get_device_name()
    print(f"peer {name} on {device}, bf16, B=1 H={HEADS} D={HEAD_DIM}")
    results = []
    for seq in args.seqs:
        gen = torch.Generator(device="cuda").manual_seed(seq)
        shape = (1, seq, HEADS, HEAD_DIM)
        q, k, v, d_o = (
            torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4)
        )
        q.requires_grad_(True)
        k.requires_grad_(True)
        v.requires_grad_(True)
        with torch.no_grad():
            f_med, f_min = time_ms(torch, lambda: fwd(q, k, v), args.warmup, args.iters)
        out = fwd(q, k, v)
        b_med, b_min = time_ms(
            torch,
            lambda: torch.autograd.grad(out, (q, k, v), d_o, retain_graph=True),
            args.warmup,
            args.iters,
        )
        flops = 4.0 * HEADS * HEAD_DIM * seq * seq
        for pas, med, mn, fl in (("fwd", f_med, f_min, flops), ("bwd", b_med, b_min, 2.5 * flops)):
            tflops = fl / (med * 1e-3) / 1e12
            print(f"T={seq:>6} {name} {pas}: median {med:9.3f} ms (min {mn:9.3f}) {tflops:7.1f} TFLOP/s")
            results.append(
                {
                    "impl": name,
                    "mode": "dense",
                    "pass": pas,
                    "seq": seq,
                    "batch": 1,
                    "heads": HEADS,
                    "head_dim": HEAD_DIM,
                    "dtype": "bf16",
                    "causal": False,
                    "block_q": None,
                    "block_k": None,
                    "density": 1.0,
                    "ms": round(med, 4),
                    "ms_min": round(mn, 4),
                    "tflops": round(tflops, 2),
                    "iters": args.iters,
                }
            )
        del q, k, v, d_o, out
        torch.cuda.empty_cache()
    doc = {"tool": name, "device": device, "results": results}
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=2)
    print(f"wrote {args.json}")
    return doc


def table(ours, peers):
    """Markdown table: per sequence and pass, linattn dense (best block shape), FA2, the ratio,
    linattn sparse and the sparse target."""
    lines = [
        f"# Block-sparse FlashAttention-2: linattn vs {peers['tool'] if peers else 'peer'}",
        "",
        f"Device: {ours.get('device')} ({ours.get('arch')}); bf16, B = 1, H = {HEADS}, D = {HEAD_DIM},"
        " non-causal; medians of CUDA-event timings after warm-up.",
        "Sparse: Radial (`hunyuan`, decay 0.95, blocks of 128). Targets: dense throughput >= 0.9x FA2;"
        " sparse time <= 1.2x dense time x density.",
        "",
        "| T | pass | linattn dense ms (blocks) | FA2 ms | FA2/linattn (>= 0.9) | density |"
        " linattn sparse ms | sparse / (dense x density) (<= 1.2) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    by = {}
    for r in ours["results"]:
        by.setdefault((r["seq"], r["pass"], r["mode"]), []).append(r)
    peer_by = {(r["seq"], r["pass"]): r for r in (peers["results"] if peers else [])}
    for seq in sorted({r["seq"] for r in ours["results"]}):
        for pas in ("fwd", "bwd"):
            dense = min(by.get((seq, pas, "dense"), []), key=lambda r: r["ms"], default=None)
            sparse = (by.get((seq, pas, "sparse")) or [None])[0]
            peer = peer_by.get((seq, pas))
            ratio = peer["ms"] / dense["ms"] if (peer and dense) else None
            sp = sparse["ms"] / (dense["ms"] * sparse["density"]) if (sparse and dense) else None
            if ratio is not None:
                verdicts.append(ratio >= 0.9)
            if sp is not None:
                verdicts.append(sp <= 1.2)
            fmt = lambda x, f="{:.3f}": "-" if x is None else f.format(x)  # noqa: E731
            lines.append(
                f"| {seq} | {pas} | {fmt(dense and dense['ms'])}"
                f" ({dense['block_q']}x{dense['block_k']}) | {fmt(peer and peer['ms'])} | {fmt(ratio, '{:.2f}')} |"
                f" {fmt(sparse and sparse['density'], '{:.3f}')} | {fmt(sparse and sparse['ms'])} |"
                f" {fmt(sp, '{:.2f}')} |"
                if dense
                else f"| {seq} | {pas} | - | {fmt(peer and peer['ms'])} | - | - | - | - |"
            )
    lines.append("")
    lines.append(f"Targets met: {sum(verdicts)} of {len(verdicts)}.")
    return "\n".join(lines) + "\n", all(verdicts)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default="benches/attention_peers.json", help="peer results (written)")
    p.add_argument("--ours", default=None, help="linattn results to compare (JSON of cargo bench)")
    p.add_argument("--run-ours", action="store_true", help="run cargo bench --bench cuda_attention first")
    p.add_argument("--table", default="benches/RESULTS_attention.md")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seqs", type=lambda s: [int(x) for x in s.split(",")], default=SEQS)
    p.add_argument("--skip-peers", action="store_true", help="only compare existing JSON files")
    args = p.parse_args()

    ours_path = args.ours
    if args.run_ours:
        ours_path = ours_path or "benches/attention_linattn.json"
        cmd = [
            "cargo", "bench", "--bench", "cuda_attention", "--",
            "--json", ours_path, "--iters", str(args.iters), "--warmup", str(args.warmup),
            "--seqs", ",".join(map(str, args.seqs)),
        ]
        env = dict(os.environ)
        # NVRTC from the wheels of scripts/install-cuda-wheels.sh when present (machines without
        # a CUDA toolkit); otherwise the system's libnvrtc.
        wheel_lib = os.path.join(".tools", "cuda", "nvidia", "cuda_nvrtc", "lib")
        if os.path.exists(os.path.join(wheel_lib, "libnvrtc.so.12")):
            env["LD_LIBRARY_PATH"] = os.path.abspath(wheel_lib) + (
                ":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else ""
            )
        print("+ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env=env)
    if args.skip_peers:
        peers = json.load(open(args.json)) if os.path.exists(args.json) else None
    else:
        peers = run_peers(args)
    if ours_path:
        if not os.path.exists(ours_path):
            print(f"no linattn results at {ours_path} (no CUDA device?)")
            return 0
        ours = json.load(open(ours_path))
        text, ok = table(ours, peers)
        print(text)
        with open(args.table, "w") as f:
            f.write(text)
        print(f"wrote {args.table}")
        return 0 if ok else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
