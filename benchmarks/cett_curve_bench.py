"""Speed of the CETT curve (Sparsing Law, PPL-p% sparsity): zero entries skipped vs every column.

``CettCurve.update`` accumulates, per token, the prefix sums of the units' contributions sorted by
unit norm. Zero entries sort first and add nothing, so it accumulates only the last columns of the
chunk (the most nonzeros of any of its tokens); ``skip_zeros=False`` is the same loop over all
``d_ff`` columns (the earlier implementation). For each share of nonzeros, one run times both on
the same activations (median of repetitions after a warm-up, interleaved), checks that the two
curves are identical, and prints the ratio.

    .venv/bin/python benchmarks/cett_curve_bench.py [--tokens 2048] [--reps 3] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sparsetrace.sparsing.cett import CettCurve, ThresholdGrid

D_FF, D_MODEL = 2048, 128  # the `cpu` preset's MLP


def activations(tokens: int, nonzero: float, seed: int = 0) -> torch.Tensor:
    """ReLU(N(0,1) - z) with z chosen so that about ``nonzero`` of the entries are positive."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1.0 - nonzero)).item()
    return (torch.randn(tokens, D_FF, generator=gen) - z).clamp_(min=0.0)


def timed(skip_zeros: bool, w: torch.Tensor, grid: torch.Tensor, a: torch.Tensor):
    curve = CettCurve(w, grid, skip_zeros=skip_zeros)
    start = time.perf_counter()
    curve.update(a)
    return time.perf_counter() - start, curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    w = torch.randn(D_MODEL, D_FF, generator=torch.Generator().manual_seed(1)) / D_FF**0.5
    print(f"CettCurve.update on {args.tokens:,} tokens, d_ff {D_FF}, d_model {D_MODEL}, "
          f"{args.threads} threads; median of {args.reps} after a warm-up")  # fmt: skip
    print(f"{'nonzero':>8} {'all columns s':>14} {'zeros skipped s':>16} {'speed-up':>9}")
    for nonzero in (0.05, 0.15, 0.30, 0.60, 1.00):
        a = activations(args.tokens, nonzero)
        sampler = ThresholdGrid(w)
        sampler.update(a)
        grid = sampler.grid()
        times: dict[str, list[float]] = {"all": [], "skip": []}
        timed(False, w, grid, a[:64])  # warm-up
        timed(True, w, grid, a[:64])
        for _ in range(args.reps):
            t_all, ref = timed(False, w, grid, a)
            t_skip, ours = timed(True, w, grid, a)
            times["all"].append(t_all)
            times["skip"].append(t_skip)
        assert torch.equal(ours.tail, ref.tail) and torch.equal(ours.dropped, ref.dropped)
        t_all, t_skip = (statistics.median(v) for v in times.values())
        print(f"{nonzero:>8.0%} {t_all:>14.3f} {t_skip:>16.3f} {t_all / t_skip:>8.2f}x")


if __name__ == "__main__":
    main()
