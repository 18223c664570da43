#!/usr/bin/env python3
"""`torch.optim.AdamW(fused=True)` on the parameter group of `linattn bench optim`, a plain device
copy of the same bytes, and the side-by-side table.

The group: the parameter count and tensor count of linattn's JSON (default 100M in 200), split
into the same uneven, odd sizes (`optim_sizes` in src/cli/bench/mod.rs). Bytes per step: 28 per
parameter (read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq), the count
linattn uses for its unchecked step. CUDA events; the median per step.

On the GPU machine `scripts/gpu-run.sh` runs it after the carried binary:

    linattn bench optim --json OUT/optim_linattn.json
    python3 benches/peers_optim.py --ours OUT/optim_linattn.json --json OUT/optim_peers.json --table OUT/optim.md
"""

import argparse
import os
import subprocess
import sys

import peers_common as pc


def sizes(total, count):
    """linattn's uneven, odd tensor sizes."""
    base = total // count
    out = []
    for i in range(count):
        wobble = (i * 7919 % 101) / 100.0 - 0.5
        out.append(int(base * (1.0 + 0.5 * wobble)) | 1)
    return out


def run_peers(torch, total, count, args):
    device = torch.device("cuda")
    tensor_sizes = sizes(total, count)
    n = sum(tensor_sizes)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in tensor_sizes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, fused=True)
    optimizer.step()  # allocates exp_avg / exp_avg_sq
    step_ms, step_min = pc.time_ms(torch, optimizer.step, args.warmup, args.iters)
    del optimizer, params
    torch.cuda.empty_cache()

    bytes_per_step = 28 * n
    src = torch.randn(bytes_per_step // 2 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy_ms, copy_min = pc.time_ms(torch, lambda: dst.copy_(src), args.warmup, args.iters)

    def gbs(ms):
        return bytes_per_step / (ms * 1e-3) / 1e9

    doc = {
        "device": torch.cuda.get_device_name(device), "torch": torch.__version__, "params": n, "tensors": count,
        "bytes_per_step": bytes_per_step,
        "torch_fused_adamw": {"ms": step_ms, "ms_min": step_min, "gb_s": gbs(step_ms)},
        "torch_copy": {"ms": copy_ms, "ms_min": copy_min, "gb_s": gbs(copy_ms)},
    }
    pc.write_json(args.json, doc)
    print(f"torch fused AdamW {step_ms:.3f} ms ({gbs(step_ms):.0f} GB/s); copy {copy_ms:.3f} ms ({gbs(copy_ms):.0f} GB/s)",
          file=sys.stderr)
    return doc


def table(ours, peers, skipped):
    gbs_peak = ours.get("peak_gb_s")
    lines = pc.header_lines(
        "Fused optimizer step: linattn vs torch.optim.AdamW(fused=True)",
        ours,
        skipped or f"`torch.optim.AdamW(fused=True)` (torch {peers.get('torch')}), a torch device copy",
    )
    lines += [
        f"{ours.get('params')} f32 parameters in {ours.get('tensors')} tensors (uneven, odd sizes); per step, "
        f"{pc.timing_note(ours)}. GB/s count the bytes a step must move (28 B per"
        " parameter; 32 B with the non-finite check's extra gradient read); % = of the datasheet memory"
        " bandwidth; copy = a device-to-device copy of the same bytes.",
        "",
        "| step | ms | GB/s | of copy | speed-up vs torch fused AdamW |",
        "|---|---:|---:|---:|---:|",
    ]
    torch_ms = peers["torch_fused_adamw"]["ms"] if peers else None
    for r in ours["results"]:
        lines.append(
            f"| linattn `{r['name']}` ({r['bytes_per_param']} B/param) | {pc.fmt(r['ms'])}"
            f" | {pc.fmt(r['gb_s'], '{:.0f}')}{pc.pct(r['gb_s'], gbs_peak)} | {100 * r['copy_ms'] / r['ms']:.0f}%"
            f" | {pc.ratio(torch_ms, r['ms'])} |"
        )
        lines.append(f"| linattn copy of the same bytes | {pc.fmt(r['copy_ms'])}"
                     f" | {pc.fmt(r['copy_gb_s'], '{:.0f}')}{pc.pct(r['copy_gb_s'], gbs_peak)} | 100% | - |")
    if peers:
        t, c = peers["torch_fused_adamw"], peers["torch_copy"]
        lines.append(f"| torch fused AdamW (28 B/param) | {pc.fmt(t['ms'])} | {pc.fmt(t['gb_s'], '{:.0f}')}"
                     f"{pc.pct(t['gb_s'], gbs_peak)} | {100 * c['ms'] / t['ms']:.0f}% | 1.00x |")
        lines.append(f"| torch copy of the same bytes | {pc.fmt(c['ms'])} | {pc.fmt(c['gb_s'], '{:.0f}')}"
                     f"{pc.pct(c['gb_s'], gbs_peak)} | 100% | - |")
    lines += ["", "Targets: the fused step >= 85% of copy bandwidth and not slower than torch's fused AdamW.", ""]
    return "\n".join(lines)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=os.path.join(here, "optim_peers.json"), help="peer results (written)")
    p.add_argument("--ours", default=None, help="JSON of `linattn bench optim --json`")
    
    p.add_argument("--run-ours", action="store_true", help="first run `cargo run --release -- bench optim`")
    p.add_argument("--no-run", action="store_true", help="time nothing: the table from the JSON of --json")
    p.add_argument("--table", default=os.path.join(here, "RESULTS_optim.md"))
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()

    if args.run_ours:
        args.ours = args.ours or os.path.join(here, "optim_linattn.json")
        cmd = ["cargo", "run", "--release", "--", "bench", "optim", "--json", args.ours]
        print("+ " + " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, cwd=os.path.dirname(here), check=True)
    ours = pc.load_json(args.ours)
    if not ours or not ours.get("results"):
        print(f"no linattn results at {args.ours}")
        return 0
    torch, why = (None, "--no-run") if args.no_run else pc.load_torch()
    peers = pc.load_json(args.json) if args.no_run else None
    if torch is None and peers is None:
        print(f"skipped: peer (torch fused AdamW): {why}")
    elif torch is not None:
        peers = run_peers(torch, ours.get("params_requested", ours["params"]), ours["tensors"], args)
    pc.write_text(args.table, table(ours, peers, None if peers else f"not run ({why})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
