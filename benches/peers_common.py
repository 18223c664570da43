"""What the three peer scripts share: loading torch (or saying why not), CUDA-event timing,
a time budget, JSON and markdown output.

The peer scripts time the peers of `linattn bench` on the same shapes and write the side-by-side
tables. They never build or run cargo on the GPU machine: `scripts/gpu-run.sh` runs the carried
`linattn` binary and hands its JSON over with `--ours`. Without torch or a CUDA device (the dry
run of `scripts/gpu-run.sh` on a CPU machine) they print one `skipped: ...` line and still write
the table from linattn's numbers alone.
"""

import datetime
import json
import os
import statistics
import sys
import time

def load_torch():
    """(torch, None) when torch sees a CUDA device, else (None, why)."""
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        return None, "torch is not installed"
    if not torch.cuda.is_available():
        return None, "torch sees no CUDA device"
    return torch, None


def time_ms(torch, fn, warmup, iters):
    """(median, min) milliseconds of `fn` over `iters` calls after `warmup`, by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(max(1, iters)):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), min(times)


class Budget:
    """Seconds left for starting new measurements (a run cut short keeps what it measured)."""

    def __init__(self, seconds):
        self.deadline = None if seconds is None else time.monotonic() + seconds

    def left(self):
        return self.deadline is None or time.monotonic() < self.deadline


def load_json(path):
    if not path or not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_json(path, doc):
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
    os.replace(tmp, path)


def write_text(path, text):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}", file=sys.stderr)


def fmt(x, spec="{:.3f}"):
    return "-" if x is None else spec.format(x)


def ratio(num, den):
    """`num / den` as `1.23x`, or `-`."""
    return "-" if num is None or den in (None, 0) else f"{num / den:.2f}x"


def pct(x, peak):
    return "" if x is None or not peak else f" ({100.0 * x / peak:.1f}%)"


def timing_note(ours):
    """How linattn's side was timed."""
    if ours.get("backend") == "cube":
        return "medians of host-clock timings around a device sync (cube), after warm-up"
    return "medians of CUDA-event timings after warm-up"


def header_lines(title, ours, peer_note):
    """The title and the provenance lines every table starts with (the device's peaks come from
    linattn's JSON: src/cli/bench/mod.rs `peaks`)."""
    tflops, gbs = ours.get("peak_tflops"), ours.get("peak_gb_s")
    return [
        f"# {title}",
        "",
        f"Device: {ours.get('device')} ({ours.get('arch')}, linattn backend `{ours.get('backend')}`);"
        f" datasheet peaks: bf16 {fmt(tflops, '{:.1f}')} TFLOP/s, memory {fmt(gbs, '{:.0f}')} GB/s.",
        f"Date: {datetime.date.today().isoformat()}. Peers: {peer_note}.",
        "",
    ]
