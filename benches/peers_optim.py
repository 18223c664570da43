#!/usr/bin/env python3
"""torch.optim.AdamW(fused=True) on the sizes of `benches/optim.rs`, and a plain device copy of
the same bytes, on a CUDA GPU. Prints one JSON object.

Sizes: LINATTN_OPTIM_BENCH_PARAMS parameters (default 100M) in LINATTN_OPTIM_BENCH_TENSORS tensors
(default 200), split exactly as the Rust bench does. Bytes per step: 28 per parameter (read param,
grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq), the same count the Rust bench uses
for its unchecked step.

Usage: python benches/peers_optim.py  (needs torch with CUDA)
"""

import json
import os
import sys


def sizes(total, count):
    """The Rust bench's uneven, odd tensor sizes."""
    base = total // count
    out = []
    for i in range(count):
        wobble = (i * 7919 % 101) / 100.0 - 0.5
        out.append(int(base * (1.0 + 0.5 * wobble)) | 1)
    return out


def time_ms(fn, iters, repeats, torch):
    """Best mean time per call over `repeats` batches of `iters` calls, by CUDA events."""
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(repeats):
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / iters)
    return best


def main():
    try:
        import torch
    except ImportError:
        print(json.dumps({"skipped": "torch is not installed"}))
        return 0
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device"}))
        return 0
    device = torch.device("cuda")
    total = int(os.environ.get("LINATTN_OPTIM_BENCH_PARAMS", 100_000_000))
    count = int(os.environ.get("LINATTN_OPTIM_BENCH_TENSORS", 200))
    iters = int(os.environ.get("LINATTN_OPTIM_BENCH_ITERS", 20))
    repeats = int(os.environ.get("LINATTN_OPTIM_BENCH_REPEATS", 5))
    tensor_sizes = sizes(total, count)
    n = sum(tensor_sizes)

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in tensor_sizes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer = torch.optim.AdamW(
        params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, fused=True
    )
    # The first step allocates exp_avg / exp_avg_sq; warm up past it.
    for _ in range(3):
        optimizer.step()
    torch.cuda.synchronize()
    step_ms = time_ms(optimizer.step, iters, repeats, torch)

    bytes_per_step = 28 * n
    src = torch.empty(bytes_per_step // 2 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    copy_ms = time_ms(lambda: dst.copy_(src), iters, repeats, torch)

    def gbps(ms):
        return bytes_per_step / (ms * 1e-3) / 1e9

    print(
        json.dumps(
            {
                "device": torch.cuda.get_device_name(device),
                "torch": torch.__version__,
                "params": n,
                "tensors": count,
                "bytes_per_step": bytes_per_step,
                "torch_fused_adamw": {"ms_per_step": step_ms, "gb_per_s": gbps(step_ms)},
                "copy_same_bytes": {"ms": copy_ms, "gb_per_s": gbps(copy_ms)},
                "fused_adamw_vs_copy": copy_ms / step_ms,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
