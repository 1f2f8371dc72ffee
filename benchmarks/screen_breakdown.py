"""Where the int8-screen MLP block spends its time: each kernel alone against its bytes.

GPT-2-medium's MLP shape (24 layers, d_model 1024, d_ff 4096, float32), random weights, each
layer's bias shifted so that ``--active`` of the units fire for the token; one token per call.
Timed interleaved, best of ``--repeats``, per 24 layers:

- the dense block on the sparse paths' own loop (``DenseGemv`` up and down);
- the screened block as the speed verb runs it (``SparseUp(screen=True)``, ReLU, ``SparseDown``);
- each of its kernels alone on the same inputs: the int8 screen (``screen_int8``), the
  candidates' float32 rows (``scattered_rows_dot``), the active units' W_out rows
  (``sparse_rows_matvec``).

Each line gives milliseconds, the bytes the step reads, the bandwidth that makes, and its share of
the dense block's bandwidth (1.0: as fast per byte as the dense GEMV).

    python benchmarks/screen_breakdown.py [--active 0.15] [--repeats 7]
"""

from __future__ import annotations

import argparse

D_MODEL, D_FF, LAYERS = 1024, 4096, 24
DENSE, BLOCK = "dense block (DenseGemv up + down)", "screened block (the speed verb's)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--active", type=float, default=0.15)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    import numba
    import numpy as np
    import torch

    from sparsetrace.speed.dense_gemv import DenseGemv
    from sparsetrace.speed.kernels import scattered_rows_dot, screen_int8, sparse_rows_matvec
    from sparsetrace.speed.measure import best_times
    from sparsetrace.speed.sparse_down import SparseDown
    from sparsetrace.speed.sparse_up import SparseUp

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, D_MODEL, generator=gen)
    layers = []
    for _ in range(LAYERS):
        w_in = torch.randn(D_FF, D_MODEL, generator=gen) / D_MODEL**0.5
        w_out = torch.randn(D_MODEL, D_FF, generator=gen) / D_FF**0.5
        pre = w_in @ x[0]
        bias = -torch.quantile(pre, 1 - args.active).expand(D_FF).clone()  # `active` fire
        up, down = SparseUp(w_in, bias, screen=True), SparseDown(w_out)
        dense_up, dense_down = DenseGemv(w_in, bias), DenseGemv(w_out)
        candidate = up.candidates(x).numpy()
        hidden = torch.relu(dense_up(x))
        layers.append((up, down, dense_up, dense_down, candidate, hidden))

    xs = x.numpy()
    partial = np.empty((numba.get_num_threads(), D_MODEL), np.float32)
    flags, first, out = (
        np.empty((1, D_FF), np.bool_),
        np.zeros((1, D_FF), np.float32),
        np.empty((1, D_MODEL), np.float32),
    )
    minus_one = np.float32(-1.0)

    def screen() -> None:
        for up, *_ in layers:
            screen_int8(up.q.numpy(), up.scales.numpy(), up.slack.numpy(), up.bias.numpy(), xs,
                        np.float32(1.0), flags)  # fmt: skip

    def rows() -> None:
        for up, _, _, _, candidate, _ in layers:
            scattered_rows_dot(up.weight.numpy(), up.bias.numpy(), xs, candidate, first)

    def down_rows() -> None:
        for _, down, _, _, _, hidden in layers:
            sparse_rows_matvec(hidden.numpy(), down.table.numpy(), down.norms.numpy(), minus_one,
                               out, partial)  # fmt: skip

    def chained() -> None:  # the three kernels per layer, as the block runs them, no modules
        for up, down, _, _, candidate, hidden in layers:
            screen_int8(up.q.numpy(), up.scales.numpy(), up.slack.numpy(), up.bias.numpy(), xs,
                        np.float32(1.0), flags)  # fmt: skip
            scattered_rows_dot(up.weight.numpy(), up.bias.numpy(), xs, candidate, first)
            sparse_rows_matvec(hidden.numpy(), down.table.numpy(), down.norms.numpy(), minus_one,
                               out, partial)  # fmt: skip

    calls = {
        DENSE: lambda: [dd(torch.relu(du(x))) for _, _, du, dd, _, _ in layers],
        BLOCK: lambda: [down(torch.relu(up(x))) for up, down, *_ in layers],
        "  screen_int8 alone": screen,
        "  candidates' rows alone": rows,
        "  W_out rows alone": down_rows,
        "  the three kernels chained per layer": chained,
    }  # fmt: skip
    c = float(np.mean([layer[4].mean() for layer in layers]))
    a = float(np.mean([(layer[5] > 0).float().mean() for layer in layers]))
    matrix = 4 * D_FF * D_MODEL * LAYERS
    screen_bytes = D_FF * (D_MODEL + 12) * LAYERS
    nbytes = {
        DENSE: 2 * matrix,
        BLOCK: screen_bytes + (c + a) * matrix,
        "  screen_int8 alone": screen_bytes, "  candidates' rows alone": c * matrix,
        "  W_out rows alone": a * matrix,
        "  the three kernels chained per layer": screen_bytes + (c + a) * matrix,
    }  # fmt: skip
    t = best_times(calls, args.repeats)
    dense_rate = nbytes[DENSE] / t[DENSE]
    print(
        f"GPT-2-medium MLP shape, {LAYERS} layers, one token; active {a:.3f}, candidates "
        f"{c:.3f}; {torch.get_num_threads()} torch threads, {numba.get_num_threads()} numba"
    )
    for name, seconds in t.items():
        rate = nbytes[name] / seconds
        print(f"{name:36s} {1e3 * seconds:7.2f} ms  {nbytes[name] / 2**20:7.1f} MiB  "
              f"{rate / 1e9:5.1f} GB/s  {rate / dense_rate:4.2f} of dense's rate")  # fmt: skip
    parts = sum(t[k] for k in ("  screen_int8 alone", "  candidates' rows alone",
                               "  W_out rows alone"))  # fmt: skip
    block = t[BLOCK]
    bound = nbytes[DENSE] / nbytes[BLOCK]
    print(
        f"kernels alone sum to {1e3 * parts:.2f} ms; the block's overhead beyond them "
        f"{1e3 * (block - parts):.2f} ms ({(block - parts) / block:.0%} of the block)"
    )
    print(
        f"speed-up over dense {t['dense block (DenseGemv up + down)'] / block:.2f}x, "
        f"bound at dense's rate {bound:.2f}x"
    )


if __name__ == "__main__":
    main()
