"""The sparse paths' compiled loops (numba).

``sparse_rows_matvec``: ``out[r] = sum over active i of h[r, i] * W_t[i]`` with ``W_t``
unit-major (d_ff, d_model), one pass over ``h`` finding the active units and adding their rows
(vectorised: ymm FMAs); single-threaded (on an Intel Xeon a parallel version ran 2-5x slower
than one thread next to torch's pool). ``bag_indices``: the same activity test, writing
``embedding_bag``'s inputs for a block-major table, so that torch sums the rows on all its
threads. ``rows_dot`` and ``screen_int8``: parallel over rows, on numba's OpenMP layer (below).
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


# Parallel loops below run on numba's OpenMP layer: next to torch's own OpenMP pool they read
# scattered rows 1.5x faster than one thread on a 2-core AMD EPYC, where the workqueue layer ran
# slower than one thread (results/bench-gather-rows.md).
numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]


@numba.njit(cache=True, nogil=True, parallel=True, fastmath={"reassoc", "contract"})
def rows_dot(
    weight: np.ndarray, bias: np.ndarray, x: np.ndarray, use: np.ndarray, out: np.ndarray
) -> int:
    """``out[r, i] = weight[i] . x[r] + bias[i]`` where ``use[r, i]``; other entries untouched.
    Each row of ``weight`` that any token uses is read once for all of them (the union of the
    tokens' units), the rows split over threads. Returns the rows read."""
    n, d = x.shape
    read = 0
    for i in numba.prange(weight.shape[0]):
        needed = False
        for r in range(n):
            needed |= use[r, i]
        if not needed:
            continue
        read += 1
        for r in range(n):
            if use[r, i]:
                acc = np.float32(0.0)
                for j in range(d):
                    acc += weight[i, j] * x[r, j]
                out[r, i] = acc + bias[i]
    return read


@numba.njit(cache=True, nogil=True, parallel=True, fastmath={"reassoc", "contract"})
def screen_int8(
    q: np.ndarray, scales: np.ndarray, slack: np.ndarray, bias: np.ndarray, x: np.ndarray,
    x_norm: np.ndarray, margin: float, out: np.ndarray,
) -> None:  # fmt: skip
    """``out[r, i] = scales[i] * (q[i] . x[r]) + bias[i] + margin * slack[i] * x_norm[r] >= 0``:
    the int8 estimate of unit i's pre-activation raised by its error bound (``margin`` = 1: the
    whole bound)."""
    n, d = x.shape
    for i in numba.prange(q.shape[0]):
        for r in range(n):
            acc = np.float32(0.0)
            for j in range(d):
                acc += np.float32(q[i, j]) * x[r, j]
            out[r, i] = acc * scales[i] + bias[i] + margin * slack[i] * x_norm[r] >= 0
