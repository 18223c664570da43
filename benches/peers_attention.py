#!/usr/bin/env python3
"""Dense FlashAttention-2 on the shapes of `linattn bench attention`, and the side-by-side table.

Times `flash_attn_func` (flash-attn, when installed) or else PyTorch's
`scaled_dot_product_attention` restricted to the flash backend (the FlashAttention-2 kernels):
bf16, B = 1, non-causal, the heads, head dim and sequence lengths of linattn's JSON, forward and
backward (the backward alone, from a stored forward, as linattn's backward launch), with CUDA
events after a warm-up, medians. Writes the peer's JSON (after every length) and the table with
the two targets:
  - dense: linattn throughput >= 0.9x FlashAttention-2 (time ratio FA2 / linattn >= 0.9);
  - sparse: linattn sparse time <= 1.2x (linattn dense time x block density).

On the GPU machine `scripts/gpu-run.sh` runs it after the carried binary:

    linattn bench attention --json OUT/attention_linattn.json
    python3 benches/peers_attention.py --ours OUT/attention_linattn.json --json OUT/attention_peers.json --table OUT/attention.md

With cargo on a GPU machine, `--run-ours` runs `cargo run --release -- bench attention` first.
"""

import argparse
import os
import subprocess
import sys

import peers_common as pc


def peer_fns(torch):
    """(name, forward(q, k, v) -> out) with q, k, v [B, T, H, D]."""
    try:
        from flash_attn import flash_attn_func  # noqa: PLC0415

        return "flash_attn_func", lambda q, k, v: flash_attn_func(q, k, v, causal=False)
    except ImportError:
        pass
    import torch.nn.functional as F  # noqa: PLC0415
    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415

    def sdpa(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=False)
        return out.transpose(1, 2)

    return "torch_sdpa_flash", sdpa


def run_peers(torch, seqs, heads, head_dim, args):
    name, fwd = peer_fns(torch)
    doc = {"tool": name, "device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": [],
           "errors": []}
    print(f"peer {name} on {doc['device']}, bf16, B=1 H={heads} D={head_dim}", file=sys.stderr)
    budget = pc.Budget(args.budget_s)
    for seq in seqs:
        if not budget.left():
            doc["errors"].append(f"T={seq}: not timed (time budget of {args.budget_s} s spent)")
            continue
        try:
            gen = torch.Generator(device="cuda").manual_seed(seq)
            shape = (1, seq, heads, head_dim)
            q, k, v, d_o = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4))
            for x in (q, k, v):
                x.requires_grad_(True)
            with torch.no_grad():
                f_med, f_min = pc.time_ms(torch, lambda: fwd(q, k, v), args.warmup, args.iters)
            out = fwd(q, k, v)
            b_med, b_min = pc.time_ms(
                torch, lambda: torch.autograd.grad(out, (q, k, v), d_o, retain_graph=True), args.warmup, args.iters
            )
            flops = 4.0 * heads * head_dim * seq * seq
            for pas, med, mn, fl in (("fwd", f_med, f_min, flops), ("bwd", b_med, b_min, 2.5 * flops)):
                tflops = fl / (med * 1e-3) / 1e12
                print(f"T={seq:>6} {name} {pas}: median {med:9.3f} ms (min {mn:9.3f}) {tflops:7.1f} TFLOP/s",
                      file=sys.stderr)
                doc["results"].append({
                    "impl": name, "mode": "dense", "pass": pas, "seq": seq, "batch": 1, "heads": heads,
                    "head_dim": head_dim, "dtype": "bf16", "causal": False, "density": 1.0,
                    "ms": med, "ms_min": mn, "tflops": tflops, "iters": args.iters,
                })
            q = k = v = d_o = out = None  # free before the next length
        except Exception as e:  # report and go on with the next length
            doc["errors"].append(f"T={seq}: {type(e).__name__}: {e}")
            print(doc["errors"][-1], file=sys.stderr)
        torch.cuda.empty_cache()
        pc.write_json(args.json, doc)
    return doc


def table(ours, peers, skipped):
    """Per sequence and pass: linattn dense (best block shape), FA2, the ratio, linattn sparse and the
    sparse target; TFLOP/s of the visited blocks and % of the bf16 peak."""
    r0 = ours["results"][0] if ours["results"] else {}
    peak = ours.get("peak_tflops")
    lines = pc.header_lines(
        "Block-sparse FlashAttention-2: linattn vs FlashAttention-2",
        ours,
        skipped or f"`{peers['tool']}` (torch {peers.get('torch')}), dense, non-causal",
    )
    lines += [
        f"{r0.get('dtype')}, B = 1, H = {r0.get('heads')}, D = {r0.get('head_dim')}, non-causal; "
        f"{pc.timing_note(ours)}. Sparse: Radial (`hunyuan`, decay 0.95, blocks of 128).",
        "Targets: dense throughput >= 0.9x FA2; sparse time <= 1.2x dense time x density. TFLOP/s of the"
        " visited blocks (4 H D per token pair forward, 2.5x backward); % = of the bf16 peak.",
        "",
        "| T | pass | linattn dense ms (blocks) | TFLOP/s | FA2 ms | TFLOP/s | FA2 / linattn (>= 0.9) |"
        " density | linattn sparse ms | sparse / (dense x density) (<= 1.2) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    by = {}
    for r in ours["results"]:
        by.setdefault((r["seq"], r["pass"], r["mode"]), []).append(r)
    peer_by = {(r["seq"], r["pass"]): r for r in (peers or {}).get("results", [])}
    for seq in sorted({r["seq"] for r in ours["results"]}):
        for pas in ("fwd", "bwd"):
            dense = min(by.get((seq, pas, "dense"), []), key=lambda r: r["ms"], default=None)
            sparse = (by.get((seq, pas, "sparse")) or [None])[0]
            if dense is None:
                continue
            peer = peer_by.get((seq, pas))
            fa_ratio = peer["ms"] / dense["ms"] if peer else None
            sp = sparse["ms"] / (dense["ms"] * sparse["density"]) if sparse else None
            if fa_ratio is not None:
                verdicts.append(fa_ratio >= 0.9)
            if sp is not None:
                verdicts.append(sp <= 1.2)
            lines.append(
                f"| {seq} | {pas} | {pc.fmt(dense['ms'])} ({dense['block_q']}x{dense['block_k']})"
                f" | {pc.fmt(dense['tflops'], '{:.1f}')}{pc.pct(dense['tflops'], peak)}"
                f" | {pc.fmt(peer and peer['ms'])} | {pc.fmt(peer and peer['tflops'], '{:.1f}')}"
                f" | {pc.fmt(fa_ratio, '{:.2f}')} | {pc.fmt(sparse and sparse['density'], '{:.3f}')}"
                f" | {pc.fmt(sparse and sparse['ms'])} | {pc.fmt(sp, '{:.2f}')} |"
            )
    for e in (peers or {}).get("errors", []):
        lines.append(f"\nPeer error: {e}")
    lines += ["", f"Targets met: {sum(verdicts)} of {len(verdicts)}.", ""]
    return "\n".join(lines)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=os.path.join(here, "attention_peers.json"), help="peer results (written)")
    p.add_argument("--ours", default=None, help="JSON of `linattn bench attention --json`")
    
    p.add_argument("--run-ours", action="store_true", help="first run `cargo run --release -- bench attention`")
    p.add_argument("--no-run", action="store_true", help="time nothing: the table from the JSON of --json")
    p.add_argument("--table", default=os.path.join(here, "RESULTS_attention.md"))
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=None, help="start no new length after this many seconds")
    args = p.parse_args()

    if args.run_ours:
        args.ours = args.ours or os.path.join(here, "attention_linattn.json")
        cmd = ["cargo", "run", "--release", "--", "bench", "attention", "--json", args.ours,
               "--iters", str(args.iters), "--warmup", str(args.warmup)]
        print("+ " + " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, cwd=os.path.dirname(here), check=True)
    ours = pc.load_json(args.ours)
    if not ours or not ours.get("results"):
        print(f"no linattn results at {args.ours}")
        return 0
    seqs = sorted({r["seq"] for r in ours["results"]})
    heads, head_dim = ours["results"][0]["heads"], ours["results"][0]["head_dim"]
    torch, why = (None, "--no-run") if args.no_run else pc.load_torch()
    peers = pc.load_json(args.json) if args.no_run else None
    if torch is None and peers is None:
        print(f"skipped: peer (FlashAttention-2): {why}")
    elif torch is not None:
        peers = run_peers(torch, seqs, heads, head_dim, args)
    pc.write_text(args.table, table(ours, peers, None if peers else f"not run ({why})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
