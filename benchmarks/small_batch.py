"""Small batches (2-16 tokens: speculative decoding, small-batch serving): how large is the union
of the tokens' active units, and does reading only the union beat dense?

Per batch size n, on GPT-2-medium's MLP shape (24 layers of 1024 x 4096, float32; every layer
its own weights), interleaved and best of --repeats:

- the down projection at a run's own activation patterns (n consecutive validation tokens,
  transplanted onto the wide layers as `sparsetrace speed` does) and at independent random
  units of the same mean fraction: dense, per token (`SparseDown`: each token's rows read
  separately, by the default numba kernel and by embedding_bag bags) and the union kernel (each
  union row read once);
- the whole plain ReLU block on random weights whose bias gives the run's mean fraction:
  dense against W_out rows (per token, the default kernel) and the exact int8 screen (the union
  of the tokens' candidates) before them.

    python benchmarks/small_batch.py RUN [--repeats 5] [--sizes 1,2,4,8,16]

Prints one table; times are microseconds per layer and call; speed-ups are over the faster of
torch's dense product and the numba GEMV (docs/speed.md: the baseline).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numba
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from sparsetrace.checkpoint import load_trained_model
from sparsetrace.data.prepare import prepare_data
from sparsetrace.speed import decode as dec
from sparsetrace.speed import measure as ms
from sparsetrace.speed.kernels import keeps
from sparsetrace.speed.sparse_down import SparseDown
from sparsetrace.speed.sparse_up import SparseUp

SHAPE = dec.SHAPES["gpt2-medium"]


@numba.njit(cache=True, nogil=True, parallel=True, fastmath={"reassoc", "contract"})
def union_rows_matmul(
    h: np.ndarray, table: np.ndarray, norms: np.ndarray, tau: float, out: np.ndarray
) -> int:
    """``out[r] = sum_i h[r, i] * W_t[i]`` over the units ``keeps`` reads, for a few tokens at
    once, with ``W_t`` stored block-major as ``table`` (blocks, d_ff, width), as SparseDown
    keeps it: each row of the union of the tokens' units is read once for all of them, the
    column blocks over threads. ``out``: (n, blocks * width). Returns the union's size."""
    n, d_ff = h.shape
    blocks, _, width = table.shape
    union = np.zeros(d_ff, dtype=np.bool_)
    for r in range(n):
        for i in range(d_ff):
            if keeps(h[r, i], norms[i], tau):
                union[i] = True
    units = np.nonzero(union)[0]
    for b in numba.prange(blocks):
        acc = np.zeros((n, width), dtype=out.dtype)
        for i in units:
            for r in range(n):
                v = h[r, i]
                if keeps(v, norms[i], tau):
                    for j in range(width):
                        acc[r, j] += v * table[b, i, j]
        out[:, b * width : (b + 1) * width] = acc
    return units.shape[0]


def union_down(down: SparseDown, h: torch.Tensor) -> torch.Tensor:
    """``down(h)`` through :func:`union_rows_matmul` (the union of the tokens' units)."""
    out = torch.empty(h.shape[0], down.blocks * down.width)
    table = down.table.view(down.blocks, down.d_ff, down.width)
    union_rows_matmul(h.contiguous().numpy(), table.numpy(), down.norms.numpy(),
                      np.float32(-1.0), out.numpy())  # fmt: skip
    return out[:, : down.d_model]


def _union(masks: list[torch.Tensor], n: int) -> float:
    """Mean over layers and consecutive n-token windows of the union's fraction of units."""
    fractions = []
    for m in masks:
        windows = m[: m.shape[0] // n * n].view(-1, n, m.shape[1]).any(1)
        fractions.append(float(windows.float().mean()))
    return float(np.mean(fractions))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default="1,2,4,8,16")
    args = parser.parse_args()
    sizes = [int(v) for v in args.sizes.split(",")]
    model, cfg = load_trained_model(args.run)
    ids = torch.as_tensor(prepare_data(cfg.data).val[:512].astype("int64"))[None]
    _, active = dec.active_patterns(model.float(), [ids[:, : cfg.data.seq_len]])
    mean_active = float(np.mean([float(a.float().mean()) for a in active]))
    wide = dec.transplant_patterns(active, SHAPE)
    gen = torch.Generator().manual_seed(0)
    layers = ms.random_layers(SHAPE.d_model, SHAPE.d_ff, SHAPE.n_layers)
    downs = [layer.sparse for layer in layers]  # the default kernel (numba)
    bag_downs = [SparseDown(layer.down, kernel="embedding_bag") for layer in layers]
    tokens = wide[0].shape[0]
    random = [torch.rand(tokens, SHAPE.d_ff, generator=gen) < float(m.float().mean())
              for m in wide]  # fmt: skip
    x = torch.randn(max(sizes), SHAPE.d_model, generator=gen)
    h = F.relu(torch.randn(max(sizes), SHAPE.d_ff, generator=gen) - 1.0)
    assert torch.allclose(union_down(bag_downs[0], h), F.linear(h, layers[0].down), atol=1e-3)
    rows = []
    for pattern, masks in (("trained (consecutive tokens)", wide), ("random units", random)):
        for n in sizes:
            hs = [
                F.linear(x[:n], layer.up).abs() * m[:n]
                for layer, m in zip(layers, masks, strict=True)
            ]

            def dense(hs=hs):
                for layer, h in zip(layers, hs, strict=True):
                    F.linear(h, layer.down)

            def gemv(hs=hs):
                for layer, h in zip(layers, hs, strict=True):
                    layer.down_gemv(h)

            def per_token(hs=hs):
                for down, h in zip(downs, hs, strict=True):
                    down._numba(h)

            def bags(hs=hs):
                for down, h in zip(bag_downs, hs, strict=True):
                    down._bags(h)

            def union(hs=hs):  # column blocks over threads, as the bags
                for down, h in zip(bag_downs, hs, strict=True):
                    union_down(down, h)

            with torch.inference_mode():
                t = ms.best_times({"dense": dense, "gemv": gemv, "numba": per_token, "bags": bags,
                                   "union": union}, args.repeats)  # fmt: skip
            per, best = len(layers), min(t["dense"], t["gemv"])
            rows.append({"part": "W_out", "pattern": pattern, "tokens": n,
                         "active per token": float(np.mean([float(m[:n].float().mean())
                                                            for m in masks])),
                         "union (window mean)": _union(masks, n),
                         "dense (us)": 1e6 * t["dense"] / per,
                         "dense GEMV (us)": 1e6 * t["gemv"] / per,
                         "numba (us)": 1e6 * t["numba"] / per,
                         "bags (us)": 1e6 * t["bags"] / per, "union (us)": 1e6 * t["union"] / per,
                         "numba speed-up": best / t["numba"], "bags speed-up": best / t["bags"],
                         "union speed-up": best / t["union"]})  # fmt: skip
            print(rows[-1], flush=True)
    # The whole plain ReLU block at real pre-activations: a bias per layer sets the fraction.
    probe = torch.randn(256, SHAPE.d_model, generator=gen)
    biases = [-torch.quantile(F.linear(probe, layer.up).flatten()[::64], 1 - mean_active)
              for layer in layers]  # fmt: skip
    ups = [SparseUp(layer.up, b.expand(SHAPE.d_ff), screen=True, max_rows=max(sizes))
           for layer, b in zip(layers, biases, strict=True)]  # fmt: skip
    for n in sizes:
        xn = x[:n]

        def dense(xn=xn):
            for layer, b in zip(layers, biases, strict=True):
                F.linear(F.relu(F.linear(xn, layer.up) + b), layer.down)

        def gemv(xn=xn):
            for layer, b in zip(layers, biases, strict=True):
                layer.down_gemv(F.relu(layer.up_gemv(xn) + b))

        def w_out_rows(xn=xn):
            for layer, b in zip(layers, biases, strict=True):
                layer.sparse(F.relu(layer.up_gemv(xn) + b))

        def screen(xn=xn):
            for layer, up in zip(layers, ups, strict=True):
                layer.sparse(F.relu(up(xn)))

        for up in ups:
            up.reset_counts()
        with torch.inference_mode():
            t = ms.best_times({"dense": dense, "gemv": gemv, "rows": w_out_rows,
                               "screen": screen}, args.repeats)  # fmt: skip
            h = F.relu(F.linear(xn, layers[0].up) + biases[0])
        per, best = len(layers), min(t["dense"], t["gemv"])
        rows.append({"part": "block", "pattern": "random weights, bias-set fraction",
                     "tokens": n, "active per token": float((h > 0).float().mean()),
                     "union (window mean)": float((h > 0).any(0).float().mean()),
                     "candidates (union)": ups[0].candidate_fraction,
                     "dense (us)": 1e6 * t["dense"] / per,
                     "dense GEMV (us)": 1e6 * t["gemv"] / per,
                     "W_out rows (us)": 1e6 * t["rows"] / per,
                     "screen (us)": 1e6 * t["screen"] / per,
                     "W_out rows speed-up": best / t["rows"],
                     "screen speed-up": best / t["screen"]})  # fmt: skip
        print(rows[-1], flush=True)
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
