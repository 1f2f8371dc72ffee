"""The sparse down projection's compiled loops (numba).

``sparse_rows_matvec``: ``out[r] = sum over active i of h[r, i] * W_t[i]`` with ``W_t``
unit-major (d_ff, d_model), one pass over ``h`` finding the active units and adding their rows
(vectorised: ymm FMAs). Single-threaded: numba's parallel loops next to torch's own thread pool
ran 2-5x slower than one thread here (default and omp threading layers, 2026-12-01).
``bag_indices``: the same activity test, writing ``embedding_bag``'s inputs for a block-major
table, so that torch sums the rows on all its threads.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, fastmath=True)
def sparse_rows_matvec(
    h: np.ndarray, weight_t: np.ndarray, norms: np.ndarray, tau: float, out: np.ndarray
) -> None:
    """``out[r, :] = sum_i h[r, i] * weight_t[i, :]`` over units with ``h != 0`` and, when
    ``tau >= 0``, ``|h| * norms >= tau`` (the CETT rule, float32 products as torch computes
    them). ``fastmath`` lets the row update vectorise; the comparison itself is exact."""
    n, d_ff = h.shape
    d = weight_t.shape[1]
    for r in range(n):
        acc = np.zeros(d, dtype=out.dtype)
        for i in range(d_ff):
            v = h[r, i]
            if v == 0:
                continue
            if tau >= 0 and np.float32(abs(v)) * norms[i] < tau:
                continue
            for j in range(d):
                acc[j] += v * weight_t[i, j]
        out[r, :] = acc


@numba.njit(cache=True, nogil=True)
def bag_indices(
    h: np.ndarray, norms: np.ndarray, tau: float, blocks: int, d_ff: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The inputs of ``embedding_bag`` over a block-major table (``blocks`` tables of ``d_ff``
    rows stacked): bag ``(r, b)`` holds token r's active units shifted into block b. Returns
    (indices, per-sample weights, bag offsets); the same activity test as
    :func:`sparse_rows_matvec`."""
    n = h.shape[0]
    count = np.zeros(n, dtype=np.int64)
    for r in range(n):
        for i in range(d_ff):
            v = h[r, i]
            if v != 0 and not (tau >= 0 and np.float32(abs(v)) * norms[i] < tau):
                count[r] += 1
    total = int(count.sum())
    index = np.empty(blocks * total, dtype=np.int64)
    weight = np.empty(blocks * total, dtype=h.dtype)
    offsets = np.empty(n * blocks, dtype=np.int64)
    start = 0  # active units of the tokens before r
    for r in range(n):
        base, k = blocks * start, 0
        for i in range(d_ff):
            v = h[r, i]
            if v != 0 and not (tau >= 0 and np.float32(abs(v)) * norms[i] < tau):
                index[base + k] = i
                weight[base + k] = v
                k += 1
        for b in range(blocks):  # block b's bag repeats the units, shifted into its table
            offsets[r * blocks + b] = base + b * k
            if b > 0:
                for j in range(k):
                    index[base + b * k + j] = index[base + j] + b * d_ff
                    weight[base + b * k + j] = weight[base + j]
        start += k
    return index, weight, offsets
