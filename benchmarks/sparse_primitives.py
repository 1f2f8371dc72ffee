"""Sparse down-projection primitives at a memory-bound shape, measured in one run (issue 15).

Per layer and token, GPT-2-medium's W_out (1024 x 4096 float32, 16 MiB; 24 layers with their own
weights, 384 MiB in all) at several active fractions: dense ``F.linear`` (reads everything),
``index_select`` of the active rows + GEMV (copies them), ``embedding_bag`` with one bag (one
thread), ``SparseDown(kernel="embedding_bag")`` (one bag per thread) and
``SparseDown(kernel="numba")``, timed interleaved; with the read bandwidth measured in the same
run. Ratios are to the dense time of the same run.

    .venv/bin/python benchmarks/sparse_primitives.py [--layers 24] [--repeats 5]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from sparsetrace.speed.measure import best_times, read_bandwidth
from sparsetrace.speed.sparse_down import SparseDown

D_MODEL, D_FF = 1024, 4096


def point(active: float, weights: list, rows_t: list, downs: dict, repeats: int,
          gen: torch.Generator) -> dict[str, float]:  # fmt: skip
    """Seconds per layer of each primitive at one active fraction (random units)."""
    k = max(1, round(active * D_FF))
    units = [torch.randperm(D_FF, generator=gen)[:k].sort().values for _ in weights]
    h = [torch.zeros(1, D_FF).index_fill_(1, u, 0.5) for u in units]
    vals, zero = torch.full((k,), 0.5), torch.zeros(1, dtype=torch.long)
    calls = {
        "dense": lambda i: F.linear(h[i], weights[i]),
        "index_select": lambda i: vals @ rows_t[i].index_select(0, units[i]),
        "1 bag": lambda i: F.embedding_bag(units[i], rows_t[i], zero, mode="sum",
                                           per_sample_weights=vals),
        **{name: (lambda i, d=d: d[i](h[i])) for name, d in downs.items()},
    }  # fmt: skip
    n = len(weights)
    # interleaved (a, b, c, a, b, c, ...): a slow spell of the shared machine hits all alike
    timed = best_times({name: (lambda f=f: [f(i) for i in range(n)]) for name, f in calls.items()},
                       repeats)  # fmt: skip
    return {name: t / n for name, t in timed.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    bandwidth = read_bandwidth()
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(D_MODEL, D_FF, generator=gen) for _ in range(args.layers)]
    rows_t = [w.t().contiguous() for w in weights]
    downs = {"bags": [SparseDown(w, kernel="embedding_bag") for w in weights],
             "numba": [SparseDown(w, kernel="numba") for w in weights]}  # fmt: skip
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s, {torch.get_num_threads()} threads, "
          f"{args.layers} layers of W_out {D_MODEL}x{D_FF}")  # fmt: skip
    print(f"{'active':>6} {'dense us':>9} {'bound us':>9} | time / dense: index_select  1 bag  "
          "bags  numba | of bound: bags numba")  # fmt: skip
    with torch.inference_mode():
        for active in (1.0, 0.2, 0.1, 0.05, 0.02):
            t = point(active, weights, rows_t, downs, args.repeats, gen)
            bound = max(1, round(active * D_FF)) * D_MODEL * 4 / bandwidth
            d = t["dense"]
            print(f"{active:6.2f} {1e6 * d:9.1f} {1e6 * bound:9.1f} | {'':13}"
                  f"{t['index_select'] / d:12.3f} {t['1 bag'] / d:6.3f} {t['bags'] / d:5.3f} "
                  f"{t['numba'] / d:6.3f} | {'':9}{bound / t['bags']:5.2f} "
                  f"{bound / t['numba']:5.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
