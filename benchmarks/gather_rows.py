"""Reading a fraction of a matrix's rows, scattered: the up projection's gather-dot
(``W[idx] @ x``) on GPT-2-medium's shape (24 layers of 4096 x 1024 float32, 15 % of rows picked
at random per layer), by torch and by numba (one row at a time or four), on each numba
threading layer; and every row by numba's two loops.

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

    from sparsetrace.speed.kernels import rows_dot, scattered_rows_dot
    from sparsetrace.speed.measure import best_times

    @numba.njit(nogil=True, fastmath={"reassoc", "contract"})
    def one_thread(w, idx, x, out):
        for k in range(idx.shape[0]):
            acc = np.float32(0.0)
            for j in range(w.shape[1]):
                acc += w[idx[k], j] * x[j]
            out[k] = acc

    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(4096, 1024, generator=gen) for _ in range(24)]
    x = torch.randn(1, 1024, generator=gen)
    picks = [torch.rand(1, 4096, generator=gen) < 0.15 for _ in weights]
    index = [p[0].nonzero()[:, 0] for p in picks]
    bias, out = np.zeros(4096, np.float32), np.zeros((1, 4096), np.float32)
    small = np.zeros(4096, np.float32)
    every = np.ones((1, 4096), np.bool_)
    calls = {
        "torch dense GEMV": lambda: [torch.mv(w, x[0]) for w in weights],
        "torch index_select + mv": lambda: [torch.mv(w.index_select(0, i), x[0])
                                            for w, i in zip(weights, index, strict=True)],
        "numba, one thread": lambda: [one_thread(w.numpy(), i.numpy(), x[0].numpy(), small)
                                      for w, i in zip(weights, index, strict=True)],
        "numba rows_dot (parallel)": lambda: [rows_dot(w.numpy(), bias, x.numpy(), p.numpy(),
                                                       out)
                                              for w, p in zip(weights, picks, strict=True)],
        "numba scattered_rows_dot": lambda: [scattered_rows_dot(w.numpy(), bias, x.numpy(),
                                                                p.numpy(), out)
                                             for w, p in zip(weights, picks, strict=True)],
        "all rows: rows_dot": lambda: [rows_dot(w.numpy(), bias, x.numpy(), every, out)
                                       for w in weights],
        "all rows: scattered_rows_dot": lambda: [scattered_rows_dot(w.numpy(), bias, x.numpy(),
                                                                    every, out)
                                                 for w in weights],
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
