"""The sparse paths' compiled loops (numba).

``sparse_rows_matvec``: ``out[r] = sum over active i of h[r, i] * W_t[i]`` with ``W_t``
unit-major (d_ff, d_model), the active rows split over threads, four at a time.
``bag_indices``: the same activity test, writing ``embedding_bag``'s inputs for a block-major
table, so that torch sums the rows on all its threads. ``rows_dot``, ``scattered_rows_dot`` and
``screen_int8``: parallel over rows; ``screened_rows_dot`` the last two in one call. Every
parallel loop runs on numba's OpenMP layer (below).
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


@numba.njit(cache=True, nogil=True, inline="always")
def group_of_four(rows: np.ndarray, g: int, k: int) -> tuple[int, int, int, int]:
    """Rows ``4g .. 4g+3`` of the first ``k`` entries of ``rows``; past the end, the last one
    again (a row already read, so the tail of the last group costs no new memory traffic)."""
    b = 4 * g
    return rows[b], rows[min(b + 1, k - 1)], rows[min(b + 2, k - 1)], rows[min(b + 3, k - 1)]


# Parallel loops below run on numba's OpenMP layer: next to torch's own OpenMP pool they read
# scattered rows 1.5x faster than one thread on a 2-core AMD EPYC, where the workqueue layer ran
# slower than one thread (results/bench-gather-rows.md).
numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]


@numba.njit(cache=True, nogil=True, parallel=True, fastmath={"reassoc", "contract"})
def sparse_rows_matvec(
    h: np.ndarray, weight_t: np.ndarray, norms: np.ndarray, tau: float, out: np.ndarray,
    partial: np.ndarray,
) -> int:  # fmt: skip
    """``out[r, :] = sum_i h[r, i] * weight_t[i, :]`` over the units :func:`keeps` reads;
    returns how many (token, unit) rows were read. Per token: one pass lists the read units,
    then each of ``partial``'s rows (one per thread: the caller asks numba for the thread count,
    which a cached function cannot) sums consecutive groups of four rows (four memory streams in
    flight, as in :func:`scattered_rows_dot`), and the partial sums are added. ``reassoc`` and
    ``contract`` let the row update vectorise (FMAs)."""
    n, d_ff = h.shape
    d = weight_t.shape[1]
    threads = partial.shape[0]
    units = np.empty(d_ff, dtype=np.int64)
    values = np.empty(d_ff, dtype=out.dtype)
    read = 0
    for r in range(n):
        k = 0
        for i in range(d_ff):
            if keeps(h[r, i], norms[i], tau):
                units[k] = i
                values[k] = h[r, i]
                k += 1
        read += k
        groups = (k + 3) // 4
        per_thread = (groups + threads - 1) // threads
        zero = np.float32(0.0)  # an int 0 would make the sum float64
        for t in numba.prange(threads):
            acc = partial[t]
            acc[:] = 0
            for g in range(t * per_thread, min(groups, (t + 1) * per_thread)):
                i0, i1, i2, i3 = group_of_four(units, g, k)  # past the last unit: weight 0
                b = 4 * g
                v0 = values[b]
                v1 = values[b + 1] if b + 1 < k else zero
                v2 = values[b + 2] if b + 2 < k else zero
                v3 = values[b + 3] if b + 3 < k else zero
                for j in range(d):
                    acc[j] += (v0 * weight_t[i0, j] + v1 * weight_t[i1, j]
                               + v2 * weight_t[i2, j] + v3 * weight_t[i3, j])  # fmt: skip
        for j in range(d):
            total = partial[0, j]
            for t in range(1, threads):
                total += partial[t, j]
            out[r, j] = total
    return read


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
def scattered_rows_dot(
    weight: np.ndarray, bias: np.ndarray, x: np.ndarray, use: np.ndarray, out: np.ndarray
) -> int:
    """:func:`rows_dot` for a scattered fraction of the rows: the union of the tokens' rows is
    listed first, then read four rows at a time, so that four memory streams are in flight where
    :func:`rows_dot` has one. Each new row is a new 4 KiB page that the hardware prefetcher must
    pick up again: at 15 % of GPT-2-medium's rows four streams read ~1.36x faster, over a whole
    matrix one stream is faster (``benchmarks/gather_rows.py``), so the dense GEMV keeps
    :func:`rows_dot`. Returns the rows read."""
    n, d = x.shape
    rows = np.empty(weight.shape[0], dtype=np.int64)
    k = 0
    for i in range(weight.shape[0]):
        needed = False
        for r in range(n):
            needed |= use[r, i]
        if needed:
            rows[k] = i
            k += 1
    for g in numba.prange((k + 3) // 4):
        i0, i1, i2, i3 = group_of_four(rows, g, k)  # a repeated last row writes the same value
        for r in range(n):
            if not (use[r, i0] or use[r, i1] or use[r, i2] or use[r, i3]):
                continue  # another token's rows
            a0 = a1 = a2 = a3 = np.float32(0.0)
            for j in range(d):
                xj = x[r, j]
                a0 += weight[i0, j] * xj
                a1 += weight[i1, j] * xj
                a2 += weight[i2, j] * xj
                a3 += weight[i3, j] * xj
            if use[r, i0]:
                out[r, i0] = a0 + bias[i0]
            if use[r, i1]:
                out[r, i1] = a1 + bias[i1]
            if use[r, i2]:
                out[r, i2] = a2 + bias[i2]
            if use[r, i3]:
                out[r, i3] = a3 + bias[i3]
    return k


@numba.njit(cache=True, nogil=True, parallel=True, fastmath={"reassoc", "contract"})
def screen_int8(
    q: np.ndarray, scales: np.ndarray, slack: np.ndarray, bias: np.ndarray, x: np.ndarray,
    margin: float, out: np.ndarray,
) -> None:  # fmt: skip
    """``out[r, i] = scales[i] * (q[i] . x[r]) + bias[i] + margin * slack[i] * ||x[r]|| >= 0``:
    the int8 estimate of unit i's pre-activation raised by its error bound (``margin`` = 1: the
    whole bound). ``||x[r]||`` is summed in float64 and rounded to float32 once (the slack
    allows for a float32 norm low by its own rounding bound)."""
    n, d = x.shape
    x_norm = np.empty(n, dtype=np.float32)
    for r in range(n):
        total = 0.0
        for j in range(d):
            total += np.float64(x[r, j]) * np.float64(x[r, j])
        x_norm[r] = np.float32(np.sqrt(total))
    for i in numba.prange(q.shape[0]):
        for r in range(n):
            acc = np.float32(0.0)
            for j in range(d):
                acc += np.float32(q[i, j]) * x[r, j]
            out[r, i] = acc * scales[i] + bias[i] + margin * slack[i] * x_norm[r] >= 0


@numba.njit(cache=True, nogil=True)
def screened_rows_dot(
    q: np.ndarray, scales: np.ndarray, slack: np.ndarray, weight: np.ndarray, bias: np.ndarray,
    x: np.ndarray, margin: float, out: np.ndarray,
) -> int:  # fmt: skip
    """The int8 screen, then the float32 rows of the units it leaves as candidates, in one call
    from Python (:func:`screen_int8`, then :func:`scattered_rows_dot`): ``out[r, i] = weight[i]
    . x[r] + bias[i]`` for token r's candidates, ``out`` untouched elsewhere. Returns the rows
    read. One call instead of two plus the torch glue between them: ~30 us a layer here."""
    candidate = np.empty((x.shape[0], q.shape[0]), dtype=np.bool_)
    screen_int8(q, scales, slack, bias, x, margin, candidate)
    return scattered_rows_dot(weight, bias, x, candidate, out)
