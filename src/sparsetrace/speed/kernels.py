"""The sparse down projection's compiled loops (numba).

``sparse_rows_matvec``: ``out[r] = sum over active i of h[r, i] * W_t[i]`` with ``W_t``
unit-major (d_ff, d_model), one pass over ``h`` finding the active units and adding their rows
(vectorised: ymm FMAs). Single-threaded: numba's parallel loops next to torch's own thread pool
ran 2-5x slower than one thread here (default and omp threading layers).
``bag_indices``: the same activity test, writing ``embedding_bag``'s inputs for a block-major
table, so that torch sums the rows on all its threads.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, inline="always")
def keeps(v: float, norm: float, tau: float) -> bool:
    """The unit is read: nonzero (``tau < 0``: no threshold), else the CETT rule in the form of
    :func:`sparsetrace.sparsing.cett.kept`: ``n >= tau and n > 0`` with ``n = |v| * norm`` in
    float32 (tau arrives as float32, as torch compares it)."""
    if tau < 0:
        return v != 0
    n = np.float32(abs(v)) * norm
    return n > 0 and n >= tau


# reassoc and contract let the row update vectorise (ymm FMAs) without touching comparisons.
@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def sparse_rows_matvec(
    h: np.ndarray, weight_t: np.ndarray, norms: np.ndarray, tau: float, out: np.ndarray
) -> int:
    """``out[r, :] = sum_i h[r, i] * weight_t[i, :]`` over the units :func:`keeps` reads;
    returns how many (token, unit) rows were read."""
    n, d_ff = h.shape
    d = weight_t.shape[1]
    read = 0
    for r in range(n):
        acc = np.zeros(d, dtype=out.dtype)
        for i in range(d_ff):
            v = h[r, i]
            if not keeps(v, norms[i], tau):
                continue
            read += 1
            for j in range(d):
                acc[j] += v * weight_t[i, j]
        out[r, :] = acc
    return read


@numba.njit(cache=True, nogil=True)
def bag_indices(
    h: np.ndarray, norms: np.ndarray, tau: float, blocks: int, d_ff: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The inputs of ``embedding_bag`` over a block-major table (``blocks`` tables of ``d_ff``
    rows stacked): bag ``(r, b)`` holds token r's units that :func:`keeps` reads, shifted into
    block b. Returns (indices, per-sample weights, bag offsets)."""
    n = h.shape[0]
    total = 0
    for r in range(n):
        for i in range(d_ff):
            if keeps(h[r, i], norms[i], tau):
                total += 1
    index = np.empty(blocks * total, dtype=np.int64)
    weight = np.empty(blocks * total, dtype=h.dtype)
    offsets = np.empty(n * blocks, dtype=np.int64)
    start = 0  # active units of the tokens before r
    for r in range(n):
        base, k = blocks * start, 0
        for i in range(d_ff):
            v = h[r, i]
            if keeps(v, norms[i], tau):
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
