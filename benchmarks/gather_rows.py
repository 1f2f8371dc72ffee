"""Reading a fraction of a matrix's rows, scattered: the up projection's gather-dot
(``W[idx] @ x``) on GPT-2-medium's shape (24 layers of 4096 x 1024 float32, 15 % of rows picked
at random per layer), by torch and by numba with one, four or eight rows in flight (the sparse
paths read ``kernels.GROUP`` = 8 through ``kernels.dot_eight``), on each numba threading layer;
and every row by numba's one-row loop (``rows_dot``, the dense GEMV) and eight at a time.

    python benchmarks/gather_rows.py [--repeats 7]

Each threading layer runs in its own process (numba fixes the layer at its first parallel
call); within a process every variant is timed interleaved, best of --repeats, and printed as
milliseconds per 24 layers and as a ratio to torch's dense GEMV of the whole matrices.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

LAYERS = ("omp", "workqueue")


def measure(repeats: int) -> None:
    import numba
    import numpy as np
    import torch

    from sparsetrace.speed.kernels import GROUP, dot_eight, rows_dot
    from sparsetrace.speed.measure import best_times

    @numba.njit(nogil=True, fastmath={"reassoc", "contract"})
    def one_thread(w, idx, x, out):
        for k in range(idx.shape[0]):
            acc = np.float32(0.0)
            for j in range(w.shape[1]):
                acc += w[idx[k], j] * x[j]
            out[k] = acc

    @numba.njit(nogil=True, parallel=True, fastmath={"reassoc", "contract"})
    def one_at_a_time(w, idx, x, out):
        for k in numba.prange(idx.shape[0]):
            acc = np.float32(0.0)
            for j in range(w.shape[1]):
                acc += w[idx[k], j] * x[j]
            out[k] = acc

    @numba.njit(nogil=True, parallel=True, fastmath={"reassoc", "contract"})
    def four_at_a_time(w, idx, x, out):  # idx padded to a multiple of 4 (the last row again)
        for g in numba.prange(idx.shape[0] // 4):
            i0, i1, i2, i3 = idx[4 * g], idx[4 * g + 1], idx[4 * g + 2], idx[4 * g + 3]
            a0 = a1 = a2 = a3 = np.float32(0.0)
            for j in range(w.shape[1]):
                a0 += w[i0, j] * x[j]
                a1 += w[i1, j] * x[j]
                a2 += w[i2, j] * x[j]
                a3 += w[i3, j] * x[j]
            out[4 * g], out[4 * g + 1], out[4 * g + 2], out[4 * g + 3] = a0, a1, a2, a3

    @numba.njit(nogil=True, parallel=True, fastmath={"reassoc", "contract"})
    def eight_at_a_time(w, idx, x, out):  # idx padded to a multiple of GROUP
        for g in numba.prange(idx.shape[0] // GROUP):
            dots = dot_eight(w, idx, GROUP * g, x)
            for e in range(GROUP):
                out[GROUP * g + e] = dots[e]

    def padded(index: np.ndarray, multiple: int) -> np.ndarray:
        extra = -len(index) % multiple
        return np.concatenate([index, np.full(extra, index[-1])]).astype(np.int64)

    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(4096, 1024, generator=gen) for _ in range(24)]
    x = torch.randn(1, 1024, generator=gen)
    picks = [torch.rand(1, 4096, generator=gen) < 0.15 for _ in weights]
    index = [p[0].nonzero()[:, 0] for p in picks]
    by4 = [padded(i.numpy(), 4) for i in index]
    by8 = [padded(i.numpy(), GROUP) for i in index]
    every8 = padded(np.arange(4096), GROUP)
    bias, out = np.zeros(4096, np.float32), np.zeros((1, 4096), np.float32)
    small = np.zeros(4096 + GROUP, np.float32)
    pairs = list(zip(weights, index, by4, by8, strict=True))
    calls = {
        "torch dense GEMV": lambda: [torch.mv(w, x[0]) for w in weights],
        "torch index_select + mv": lambda: [torch.mv(w.index_select(0, i), x[0])
                                            for w, i, _, _ in pairs],
        "numba, one thread": lambda: [one_thread(w.numpy(), i.numpy(), x[0].numpy(), small)
                                      for w, i, _, _ in pairs],
        "numba, one row": lambda: [one_at_a_time(w.numpy(), i.numpy(), x[0].numpy(), small)
                                   for w, i, _, _ in pairs],
        "numba, four rows": lambda: [four_at_a_time(w.numpy(), i4, x[0].numpy(), small)
                                     for w, _, i4, _ in pairs],
        "numba, eight rows": lambda: [eight_at_a_time(w.numpy(), i8, x[0].numpy(), small)
                                      for w, _, _, i8 in pairs],
        "all rows: rows_dot": lambda: [rows_dot(w.numpy(), bias, x.numpy(), out) for w in weights],
        "all rows: eight at a time": lambda: [eight_at_a_time(w.numpy(), every8, x[0].numpy(),
                                                              small) for w in weights],
    }  # fmt: skip
    t = best_times(calls, repeats)
    layer = numba.threading_layer()
    for name, seconds in t.items():
        ratio = t["torch dense GEMV"] / seconds
        print(f"{layer:10s} {name:28s} {1e3 * seconds:8.2f} ms  {ratio:5.2f}x dense", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--layer", choices=LAYERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.layer:
        measure(args.repeats)
        return
    for layer in LAYERS:
        env = os.environ | {"NUMBA_THREADING_LAYER": layer}
        subprocess.run([sys.executable, __file__, "--layer", layer, "--repeats",
                        str(args.repeats)], env=env, check=True)  # fmt: skip


if __name__ == "__main__":
    main()
