"""Speed of the use metrics (section 2.1, A.6): fast path, naive reference, one read of the tensor.

For each shape, one run measures (a) ``use_stats`` with the 50/65/75/90 percentiles, (b) the naive
A.6 transcription in ``tests/reference.py``, (c) ``acts.sum()``, a floor set by memory bandwidth
(one read of the tensor). Times are medians over repetitions after a warm-up. At the paper's shape
the naive reference is timed on a subset of the sequences and scaled linearly when the full batch
would take more than ~60 s; the output says so.

    .venv/bin/python benchmarks/metrics_bench.py [--quick] [--threads N] [--reps R]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import reference_stats
from sparsetrace.metrics.use import use_stats

PERCENTILES = (50.0, 65.0, 75.0, 90.0)
CPU_SHAPE = (16, 128, 2048)
PAPER_SHAPE = (16, 512, 32768)  # device batch 16 x 512 tokens, hidden 32768 (section 2.1)
NAIVE_BUDGET_S = 60.0


def relu_acts(shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    """float32 ReLU(N(0,1) - 1.6): about 5% of units nonzero per token, like Table 1's layers."""
    gen = torch.Generator().manual_seed(seed)
    acts = torch.randn(shape, generator=gen)
    return acts.sub_(1.6).clamp_(min=0.0)


def median_ms(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def naive_ms(acts: torch.Tensor, reps: int) -> tuple[float, str]:
    """Naive reference time for the whole batch, and a note when it was extrapolated."""
    batch = acts.shape[0]
    probe = min(2, batch)
    arr = acts.numpy()
    probe_ms = median_ms(lambda: reference_stats(arr[:probe], None, PERCENTILES), 1, warmup=0)
    estimate_ms = probe_ms * batch / probe
    if estimate_ms / 1000 * (reps + 1) <= NAIVE_BUDGET_S:
        return median_ms(lambda: reference_stats(arr, None, PERCENTILES), reps), ""
    sub = max(probe, min(batch, int(NAIVE_BUDGET_S * 1000 / (reps * probe_ms / probe))))
    sub_ms = median_ms(lambda: reference_stats(arr[:sub], None, PERCENTILES), reps, warmup=0)
    note = f"naive extrapolated: timed on {sub}/{batch} sequences, scaled x{batch / sub:g}"
    return sub_ms * batch / sub, note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU-size shape only")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shapes = [CPU_SHAPE] if args.quick else [CPU_SHAPE, PAPER_SHAPE]
    load_before = os.getloadavg()[0]

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, ", end="")
    print(f"percentiles {', '.join(f'{p:g}' for p in PERCENTILES)}; median of {args.reps} reps")
    header = ("shape", "fast ms", "naive ms", "naive/fast", "floor ms", "fast/floor")
    rows, notes = [], []
    for shape in shapes:
        acts = relu_acts(shape)
        fast = median_ms(lambda a=acts: use_stats(a, None, PERCENTILES), args.reps)
        floor = median_ms(lambda a=acts: a.sum(), args.reps)
        naive, note = naive_ms(acts, max(1, args.reps // 2))
        label = "x".join(map(str, shape))
        if note:
            notes.append(f"{label}: {note}")
        rows.append(
            (
                label,
                f"{fast:.1f}",
                f"{naive:.1f}",
                f"{naive / fast:.1f}x",
                f"{floor:.1f}",
                f"{fast / floor:.2f}x",
            )
        )
        del acts
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    for note in notes:
        print(note)
    # Other processes on a small machine skew every column; this says how busy it was.
    print(f"load average before {load_before:.2f}, after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
