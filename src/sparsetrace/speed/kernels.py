"""The sparse paths' compiled loops (numba).

``mlp_rows``: a ReLU-family MLP (up projection read in full, gated or int8-screened; the
activation; the active units' W_out rows) as one parallel loop, each thread one consecutive
chunk of the units. ``sparse_rows_matvec``: a down projection alone, the same way.
``bag_indices``: the activity test writing ``embedding_bag``'s inputs for a block-major table.
``screen_int8``: the int8 screen alone. ``rows_dot``: the dense GEMV. Scattered rows are read
eight at a time (``GROUP``): each unit's row is a 4 KiB page whose memory stream the hardware
prefetcher must pick up anew, and eight streams in flight hide that restart; over a whole matrix
one stream per thread is faster (``benchmarks/gather_rows.py``). Every parallel loop runs on
numba's OpenMP layer (below).
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


# Parallel loops below run on numba's OpenMP layer: next to torch's own OpenMP pool they read
# scattered rows 1.4-2.2x faster than one thread on a 2-core AMD EPYC, where the workqueue
# layer ran slower than one thread (results/bench-gather-rows.md).
numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]

GROUP = 8  # scattered rows read at once (module docstring); dot_eight and add_rows spell out 8


@numba.njit(cache=True, nogil=True, inline="always")
def pad(rows: np.ndarray, k: int, lo: int) -> None:
    """Repeat the last of the ``k`` listed rows (``lo`` if none) over the next GROUP entries: a
    group past the end reads a row already read, no new memory traffic, and no loop has to
    test where the list ends."""
    last = rows[k - 1] if k > 0 else lo
    for e in range(k, k + GROUP):
        rows[e] = last


@numba.njit(cache=True, nogil=True, inline="always")
def dot_eight(weight: np.ndarray, rows: np.ndarray, b: int, x: np.ndarray) -> tuple:
    """``weight[rows[b + e]] . x`` for e < 8, the eight rows read side by side."""
    i0, i1, i2, i3 = rows[b], rows[b + 1], rows[b + 2], rows[b + 3]
    i4, i5, i6, i7 = rows[b + 4], rows[b + 5], rows[b + 6], rows[b + 7]
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0.0)
    for j in range(x.shape[0]):
        xj = x[j]
        a0 += weight[i0, j] * xj
        a1 += weight[i1, j] * xj
        a2 += weight[i2, j] * xj
        a3 += weight[i3, j] * xj
        a4 += weight[i4, j] * xj
        a5 += weight[i5, j] * xj
        a6 += weight[i6, j] * xj
        a7 += weight[i7, j] * xj
    return a0, a1, a2, a3, a4, a5, a6, a7


@numba.njit(cache=True, nogil=True, inline="always")
def union(use: np.ndarray, lo: int, hi: int, rows: np.ndarray) -> int:
    """List in ``rows`` (room for ``hi - lo + GROUP``) the units ``i`` of ``[lo, hi)`` that some
    token uses (``use[r, i - lo]``), padded (:func:`pad`); returns how many."""
    k = 0
    for i in range(lo, hi):
        needed = False
        for r in range(use.shape[0]):
            needed |= use[r, i - lo]
        rows[k] = i
        k += needed  # no branch (down_chunk's why)
    pad(rows, k, lo)
    return k


@numba.njit(cache=True, nogil=True, inline="always")
def rows_chunk(
    weight: np.ndarray, bias: np.ndarray, x: np.ndarray, use: np.ndarray, lo: int,
    rows: np.ndarray, k: int, out: np.ndarray,
) -> None:  # fmt: skip
    """``out[r, i] = weight[i] . x[r] + bias[i]`` for the units of ``rows[:k]`` (padded) that
    token r uses (``use[r, i - lo]``), eight rows at a time; other entries untouched."""
    for b in range(0, k, GROUP):
        stop = min(GROUP, k - b)
        for r in range(x.shape[0]):
            needed = False
            for e in range(stop):
                needed |= use[r, rows[b + e] - lo]
            if not needed:
                continue  # other tokens' rows
            dots = dot_eight(weight, rows, b, x[r])
            for e in range(stop):
                i = rows[b + e]
                if use[r, i - lo]:
                    out[r, i] = dots[e] + bias[i]


@numba.njit(cache=True, nogil=True, inline="always")
def dense_rows(
    weight: np.ndarray, bias: np.ndarray, x: np.ndarray, lo: int, hi: int, out: np.ndarray
) -> None:
    """``out[r, i] = weight[i] . x[r] + bias[i]`` for every token and the rows of ``[lo, hi)``,
    one row at a time."""
    for i in range(lo, hi):
        for r in range(x.shape[0]):
            acc = np.float32(0.0)
            for j in range(x.shape[1]):
                acc += weight[i, j] * x[r, j]
            out[r, i] = acc + bias[i]


@numba.njit(cache=True, nogil=True, inline="always")
def add_rows(
    acc: np.ndarray, weight_t: np.ndarray, units: np.ndarray, values: np.ndarray, k: int
) -> None:
    """``acc += sum over e < k of values[e] * weight_t[units[e]]``, eight rows at a time
    (``units`` padded by :func:`pad`, ``values`` by zeros)."""
    for b in range(0, k, GROUP):
        i0, i1, i2, i3 = units[b], units[b + 1], units[b + 2], units[b + 3]
        i4, i5, i6, i7 = units[b + 4], units[b + 5], units[b + 6], units[b + 7]
        v0, v1, v2, v3 = values[b], values[b + 1], values[b + 2], values[b + 3]
        v4, v5, v6, v7 = values[b + 4], values[b + 5], values[b + 6], values[b + 7]
        for j in range(acc.shape[0]):
            acc[j] += ((v0 * weight_t[i0, j] + v1 * weight_t[i1, j])
                       + (v2 * weight_t[i2, j] + v3 * weight_t[i3, j])
                       + (v4 * weight_t[i4, j] + v5 * weight_t[i5, j])
                       + (v6 * weight_t[i6, j] + v7 * weight_t[i7, j]))  # fmt: skip


@numba.njit(cache=True, nogil=True, inline="always")
def down_chunk(
    h: np.ndarray, r: int, norms: np.ndarray, tau: float, lo: int, hi: int, weight_t: np.ndarray,
    units: np.ndarray, values: np.ndarray, acc: np.ndarray,
) -> int:  # fmt: skip
    """``acc = sum of h[r, i] * weight_t[i]`` over the units of ``[lo, hi)`` that :func:`keeps`
    reads (listed in ``units`` and ``values``, room for ``hi - lo + GROUP``, without branches:
    a unit's activity is a coin flip for the branch predictor); returns how many."""
    k = 0
    for i in range(lo, hi):
        v = h[r, i]
        units[k] = i
        values[k] = v
        k += keeps(v, norms[i], tau)
    pad(units, k, lo)
    for e in range(k, k + GROUP):
        values[e] = 0  # a padded row adds nothing
    acc[:] = 0
    add_rows(acc, weight_t, units, values, k)
    return k


@numba.njit(cache=True, nogil=True, inline="always")
def l2_norms(x: np.ndarray) -> np.ndarray:
    """``||x[r]||`` summed in float64, rounded to float32 once."""
    out = np.empty(x.shape[0], dtype=np.float32)
    for r in range(x.shape[0]):
        total = 0.0
        for j in range(x.shape[1]):
            total += np.float64(x[r, j]) * np.float64(x[r, j])
        out[r] = np.float32(np.sqrt(total))
    return out


@numba.njit(cache=True, nogil=True, inline="always")
def screen_chunk(
    q: np.ndarray, scales: np.ndarray, slack: np.ndarray, bias: np.ndarray, x: np.ndarray,
    x_norm: np.ndarray, margin: float, lo: int, hi: int, use: np.ndarray,
) -> None:  # fmt: skip
    """``use[r, i - lo]`` for the units of ``[lo, hi)``: ``scales[i] * (q[i] . x[r]) + bias[i]
    + margin * slack[i] * ||x[r]|| >= 0``, the int8 estimate raised by its error bound."""
    for i in range(lo, hi):
        for r in range(x.shape[0]):
            acc = np.float32(0.0)
            for j in range(x.shape[1]):
                acc += np.float32(q[i, j]) * x[r, j]
            use[r, i - lo] = acc * scales[i] + bias[i] + margin * slack[i] * x_norm[r] >= 0


@numba.njit(cache=True, nogil=True, inline="always")
def chunk_of(t: int, threads: int, size: int) -> tuple[int, int]:
    """Thread t's units ``[lo, hi)`` of ``size``, in ``threads`` consecutive chunks."""
    per = (size + threads - 1) // threads
    return min(size, t * per), min(size, (t + 1) * per)


@numba.njit(cache=True, nogil=True, inline="always")
def sum_partials(partial: np.ndarray, out: np.ndarray) -> None:
    """``out[r] = sum over t of partial[t, r]``."""
    for r in range(out.shape[0]):
        for j in range(out.shape[1]):
            total = partial[0, r, j]
            for t in range(1, partial.shape[0]):
                total += partial[t, r, j]
            out[r, j] = total


@numba.njit(cache=True, nogil=True, parallel=True, fastmath={"reassoc", "contract"})
def sparse_rows_matvec(
    h: np.ndarray, weight_t: np.ndarray, norms: np.ndarray, tau: float, out: np.ndarray,
    threads: int,
) -> int:  # fmt: skip
    """``out[r, :] = sum_i h[r, i] * weight_t[i, :]`` over the units :func:`keeps` reads;
    returns how many (token, unit) rows were read. Each of ``threads`` (the caller asks numba
    for the count: a cached function cannot) sums one consecutive chunk of the units for every
    token into its own partial sums, added at the end. ``reassoc`` and ``contract`` let the row
    update vectorise (FMAs)."""
    n, d_ff = h.shape
    partial = np.empty((threads, n, weight_t.shape[1]), dtype=np.float32)
    read = np.zeros(threads, dtype=np.int64)
    for t in numba.prange(threads):
        lo, hi = chunk_of(t, threads, d_ff)
        units = np.empty(hi - lo + GROUP, dtype=np.int64)
        values = np.empty(hi - lo + GROUP, dtype=np.float32)
        acc = np.empty(weight_t.shape[1], dtype=np.float32)  # private: no aliasing to prove
        for r in range(n):
            read[t] += down_chunk(h, r, norms, tau, lo, hi, weight_t, units, values, acc)
            partial[t, r] = acc
    sum_partials(partial, out)
    return read.sum()


@numba.njit(cache=True, nogil=True, parallel=True, fastmath={"reassoc", "contract"})
def screen_int8(
    q: np.ndarray, scales: np.ndarray, slack: np.ndarray, bias: np.ndarray, x: np.ndarray,
    margin: float, out: np.ndarray, threads: int,
) -> None:  # fmt: skip
    """``out[r, i]``: unit i is a candidate for token r (:func:`screen_chunk`, ``margin`` = 1:
    the whole bound), the rows split into ``threads`` chunks (the caller asks numba for the
    count: a cached function cannot). ``||x[r]||`` is summed in float64 and rounded
    to float32 once (the slack allows for a float32 norm low by its own rounding bound)."""
    x_norm = l2_norms(x)
    for t in numba.prange(threads):
        lo, hi = chunk_of(t, threads, q.shape[0])
        screen_chunk(q, scales, slack, bias, x, x_norm, margin, lo, hi, out[:, lo:hi])


@numba.njit(cache=True, nogil=True, parallel=True, fastmath={"reassoc", "contract"})
def mlp_rows(
    x: np.ndarray, first_w: np.ndarray, first_b: np.ndarray, second_w: np.ndarray,
    second_b: np.ndarray, q: np.ndarray, scales: np.ndarray, slack: np.ndarray, margin: float,
    weight_t: np.ndarray, out_b: np.ndarray, square: bool, threads: int, first: np.ndarray,
    second: np.ndarray, h: np.ndarray, out: np.ndarray,
) -> tuple[int, int, int]:  # fmt: skip
    """A ReLU-family MLP's sparse rows for ``x`` (n, d_model) in one parallel loop over
    ``threads`` consecutive chunks of the units (the caller asks numba for the count: a cached
    function cannot), each chunk from the first projection to its share of the second.

    Per chunk: ``first[r, i] = first_w[i] . x[r] + first_b[i]`` (plain up or gate) for the
    units the int8 screen keeps for token r (``q`` non-empty: :func:`screen_chunk`), else for
    all; gated (``second_w`` non-empty): ``second[r, i] = second_w[i] . x[r] + second_b[i]`` for
    the units whose gate is positive; entries not computed are 0. With a down projection
    (``weight_t`` (d_ff, d_model) non-empty): ``h`` = ReLU(first) (``square``: squared; gated:
    times ``second``) and ``out[r] = sum_i h[r, i] * weight_t[i] + out_b`` over its nonzero
    units (``out_b`` empty: no bias). ``first``, ``second`` and ``h`` (n, d_ff) are written
    where given; empty, the kernel keeps them to itself. Returns the first projection's rows,
    the second's and the (token, unit) down rows read."""
    n, d_ff = x.shape[0], first_w.shape[0]
    screen, gated, down = q.shape[0] > 0, second_w.shape[0] > 0, weight_t.shape[0] > 0
    if first.shape[0] == 0:
        first = np.empty((n, d_ff), dtype=np.float32)
    if gated and second.shape[0] == 0:
        second = np.empty((n, d_ff), dtype=np.float32)
    if down and h.shape[0] == 0:
        h = np.empty((n, d_ff), dtype=np.float32)
    partial = np.empty((threads, n, weight_t.shape[1]), dtype=np.float32)
    reads = np.zeros((threads, 3), dtype=np.int64)
    x_norm = l2_norms(x) if screen else np.empty(0, dtype=np.float32)
    zero = np.float32(0.0)
    for t in numba.prange(threads):
        lo, hi = chunk_of(t, threads, d_ff)
        use = np.empty((n, max(hi - lo, 1)), dtype=np.bool_)
        rows = np.empty(hi - lo + GROUP, dtype=np.int64)
        for r in range(n):  # entries not computed are 0 (the full read writes them all)
            if screen:
                first[r, lo:hi] = 0
            if gated:
                second[r, lo:hi] = 0
        if screen:
            screen_chunk(q, scales, slack, first_b, x, x_norm, margin, lo, hi, use)
            k = union(use, lo, hi, rows)
            rows_chunk(first_w, first_b, x, use, lo, rows, k, first)
            reads[t, 0] = k
        else:  # every row: one at a time reads a whole matrix faster (rows_dot's why)
            dense_rows(first_w, first_b, x, lo, hi, first)
            reads[t, 0] = hi - lo
        if gated:
            for r in range(n):
                for i in range(lo, hi):
                    use[r, i - lo] = first[r, i] > 0
            k = union(use, lo, hi, rows)
            rows_chunk(second_w, second_b, x, use, lo, rows, k, second)
            reads[t, 1] = k
        if down:
            values = np.empty(hi - lo + GROUP, dtype=np.float32)
            acc = np.empty(weight_t.shape[1], dtype=np.float32)  # private: no aliasing to prove
            for r in range(n):
                for i in range(lo, hi):
                    v = max(first[r, i], zero)
                    h[r, i] = v * second[r, i] if gated else v * v if square else v
                # tau -1: every nonzero unit (norms unused: first_b stands in for them)
                reads[t, 2] += down_chunk(h, r, first_b, -1.0, lo, hi, weight_t, rows, values,
                                          acc)  # fmt: skip
                partial[t, r] = acc
    if down:
        sum_partials(partial, out)
        for r in range(n):
            for j in range(out_b.shape[0]):
                out[r, j] += out_b[j]
    total = reads.sum(axis=0)
    return total[0], total[1], total[2]


@numba.njit(cache=True, nogil=True, parallel=True, fastmath={"reassoc", "contract"})
def rows_dot(weight: np.ndarray, bias: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """``out = x weight^T + bias``: every row read once for all tokens, one row at a time, the
    rows split over threads (the dense GEMV: over a whole matrix one memory stream per thread
    reads faster than :data:`GROUP` of them, ``benchmarks/gather_rows.py``)."""
    for i in numba.prange(weight.shape[0]):
        dense_rows(weight, bias, x, i, i + 1, out)
