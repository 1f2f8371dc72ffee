"""Timing the MLP block and decoding, dense against sparse, and the bound each is judged by.

The bound is physical: batch-1 decoding reads every weight it uses once per token, so its time
cannot fall below ``bytes read / read bandwidth``, with the bandwidth measured in the same run
(:func:`read_bandwidth`). The dense MLP block reads ``W_in`` and ``W_out``; the sparse one reads
``W_in`` (the up projection decides which units are active) and the active fraction ``a`` of
``W_out``: its bound speed-up is ``2 / (1 + a)`` for a plain MLP, whatever the kernel. An
*oracle* row shows what knowing the active units before the up projection would allow (predictor
methods: read ``a`` of both), as a bound only. Each time is the best of ``repeats`` (the machine
is shared; the minimum is the least disturbed run), every layer with its own weights so that the
working set is the model's, not a cache's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsetrace.speed.dense_gemv import DenseGemv
from sparsetrace.speed.sparse_down import DEFAULT_KERNEL, SparseDown

if TYPE_CHECKING:
    from sparsetrace.speed.decode import Swap

BANDWIDTH_BYTES = 1 << 30  # 1 GiB: larger than any last-level cache we run on
GEMV = "dense GEMV"  # the dense baseline on the numba loop (DenseGemv)


def best_times(fns: Mapping[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Seconds of the fastest of ``repeats`` calls of each function, the calls interleaved
    (a, b, a, b, ...) so that a slow spell of the shared machine hits every variant alike; one
    untimed warm-up call each first."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls (after one untimed call)."""
    return best_times({"": fn}, repeats)[""]


def read_bandwidth(nbytes: int = BANDWIDTH_BYTES, repeats: int = 5) -> float:
    """Bytes per second read from memory: the fastest of a full reduction, torch's
    matrix-vector product and the numba one (:class:`DenseGemv`) over ``nbytes`` of float32 (the
    bound must not be one that a dense kernel beats: GEMV reads faster than ``sum`` here, and
    the numba GEMV faster than torch's on some hosts)."""
    buffer = torch.ones(nbytes // 4, dtype=torch.float32)
    matrix = buffer.view(-1, 4096)
    vector = torch.ones(1, 4096)
    gemv = DenseGemv(matrix)
    reads = {"sum": buffer.sum, "torch": lambda: F.linear(vector, matrix),
             "numba": lambda: gemv(vector)}  # fmt: skip
    return buffer.numel() * 4 / min(best_times(reads, repeats).values())


@dataclass(frozen=True)
class MlpLayer:
    """One plain MLP's weights for timing: up (d_ff, d_model), down (d_model, d_ff) in
    ``nn.Linear``'s layout for torch's dense path, both on the numba GEMV (sharing the
    tensors), and the down projection as a SparseDown."""

    up: Tensor
    down: Tensor
    sparse: SparseDown
    up_gemv: DenseGemv
    down_gemv: DenseGemv

    @classmethod
    def of(cls, up: Tensor, down: Tensor, kernel: str = DEFAULT_KERNEL) -> MlpLayer:
        up, down = up.detach().float().contiguous(), down.detach().float().contiguous()
        return cls(up, down, SparseDown(down, kernel=kernel), DenseGemv(up), DenseGemv(down))


def random_layers(
    d_model: int, d_ff: int, n_layers: int, kernel: str = DEFAULT_KERNEL, seed: int = 0
) -> list[MlpLayer]:
    """LeCun-normal random MLP weights, one set per layer (no two layers share memory)."""
    gen = torch.Generator().manual_seed(seed)
    return [MlpLayer.of(torch.randn(d_ff, d_model, generator=gen) * d_model**-0.5,
                        torch.randn(d_model, d_ff, generator=gen) * d_ff**-0.5, kernel)
            for _ in range(n_layers)]  # fmt: skip


@dataclass(frozen=True)
class BlockTiming:
    """Per layer and token: dense and sparse MLP seconds at ``active`` (mean fraction of units
    read), and the bounds from ``bandwidth`` (bytes/s)."""

    active: float
    dense: float  # torch's GEMV
    gemv: float  # the numba GEMV (the sparse path's kernel family)
    sparse: float
    bandwidth: float
    up_bytes: float  # per layer, mean over layers
    down_bytes: float

    @property
    def speedup(self) -> float:
        """Over the faster of the two dense kernels."""
        return min(self.dense, self.gemv) / self.sparse

    @property
    def bound_sparse(self) -> float:
        """Seconds to read W_in and the active rows of W_out."""
        return (self.up_bytes + self.active * self.down_bytes) / self.bandwidth

    @property
    def bound_dense(self) -> float:
        return (self.up_bytes + self.down_bytes) / self.bandwidth

    @property
    def bound_speedup(self) -> float:
        """The memory bound's speed-up, = the FLOP ratio 2 / (1 + a) for a plain MLP."""
        return self.bound_dense / self.bound_sparse

    @property
    def of_bound(self) -> float:
        """Fraction of the bound the sparse path reaches (1 = at the bandwidth limit)."""
        return self.bound_sparse / self.sparse

    @property
    def dense_of_bound(self) -> float:
        return self.bound_dense / min(self.dense, self.gemv)

    @property
    def oracle_bound_speedup(self) -> float:
        """If the active units were known before the up projection (a perfect predictor)."""
        return 1.0 / max(self.active, 1e-12)

    def row(self) -> dict[str, float]:
        return {
            "path": "W_out rows", "active fraction": self.active,
            "candidate fraction": 1.0, "dense (us)": 1e6 * self.dense,
            "dense GEMV (us)": 1e6 * self.gemv, "sparse (us)": 1e6 * self.sparse,
            "speed-up": self.speedup, "speed-up vs torch": self.dense / self.sparse,
            "bound speed-up": self.bound_speedup, "sparse of bound": self.of_bound,
            "dense of bound": self.dense_of_bound, "oracle bound speed-up":
            self.oracle_bound_speedup,
        }  # fmt: skip


def time_mlp_block(
    layers: Sequence[MlpLayer], inputs: Sequence[Tensor], masks: Sequence[Tensor],
    bandwidth: float, repeats: int = 5,
) -> BlockTiming:  # fmt: skip
    """Seconds per layer and token of the MLP block, dense vs sparse, one token at a time.

    ``inputs[l]``: (tokens, d_model) MLP inputs of layer l; ``masks[l]``: (tokens, d_ff) 0/1, the
    units active for each token. The hidden activation is ``|W_in x| * mask`` (exactly those
    units nonzero), so the sweep sets the sparsity while both paths do the same work up to
    ``W_out``. A timed call decodes every token through every layer, as in decoding."""
    tokens = inputs[0].shape[0]
    pairs = zip(inputs, masks, strict=True)
    rows = [[(x[t : t + 1], m[t : t + 1]) for t in range(tokens)] for x, m in pairs]

    def run(path: str) -> None:
        for t in range(tokens):
            for layer, per_token in zip(layers, rows, strict=True):
                x, mask = per_token[t]
                if path == "dense":
                    F.linear(F.linear(x, layer.up).abs_().mul_(mask), layer.down)
                    continue
                h = layer.up_gemv(x).abs_().mul_(mask)
                layer.sparse(h) if path == "sparse" else layer.down_gemv(h)

    paths = ("dense", "gemv", "sparse")
    with torch.inference_mode():
        times = best_times({path: partial(run, path) for path in paths}, repeats)
    calls, n = tokens * len(layers), len(layers)
    active = float(torch.stack([m.float().mean() for m in masks]).mean())
    up = sum(layer.up.numel() * layer.up.element_size() for layer in layers) / n
    down = sum(layer.down.numel() * layer.down.element_size() for layer in layers) / n
    dense, gemv, sparse = (times[path] / calls for path in paths)
    return BlockTiming(active, dense, gemv, sparse, bandwidth, up, down)


def random_masks(tokens: int, widths: Sequence[int], active: float, seed: int = 0) -> list[Tensor]:
    """(tokens, width) 0/1 per layer of ``widths``: exactly round(active * width) units per
    token, uniform."""
    gen = torch.Generator().manual_seed(seed)
    masks = []
    for width in widths:
        k = max(1, round(active * width))
        order = torch.rand(tokens, width, generator=gen).argsort(dim=1)
        masks.append(torch.zeros(tokens, width).scatter_(1, order[:, :k], 1.0))
    return masks


@dataclass(frozen=True)
class PathTiming:
    """Per layer and token: one sparse path of real MLP modules against the dense MLP, with the
    bytes each read (the sparse modules' own counts) and the bound they imply."""

    path: str
    active: float  # mean fraction of units W_out read
    candidates: float  # mean fraction of the (gate's) float32 rows read; 1 = all
    dense: float  # torch's GEMV
    gemv: float  # the numba GEMV (the sparse paths' kernel family)
    sparse: float
    dense_bytes: float
    sparse_bytes: float
    bandwidth: float

    @property
    def bound_speedup(self) -> float:
        return self.dense_bytes / self.sparse_bytes

    @property
    def speedup(self) -> float:
        """Over the faster of the two dense kernels."""
        return min(self.dense, self.gemv) / self.sparse

    def row(self) -> dict[str, float | str]:
        return {
            "path": self.path, "active fraction": self.active,
            "candidate fraction": self.candidates, "dense (us)": 1e6 * self.dense,
            "dense GEMV (us)": 1e6 * self.gemv, "sparse (us)": 1e6 * self.sparse,
            "speed-up": self.speedup, "speed-up vs torch": self.dense / self.sparse,
            "bound speed-up": self.bound_speedup,
            "sparse of bound": self.sparse_bytes / self.bandwidth / self.sparse,
            "dense of bound": self.dense_bytes / self.bandwidth / min(self.dense, self.gemv),
        }  # fmt: skip


def time_mlp_paths(
    model: nn.Module, inputs: Sequence[Tensor], swaps: Mapping[str, Swap], bandwidth: float,
    repeats: int = 5,
) -> list[PathTiming]:  # fmt: skip
    """Seconds per layer and token of our model's MLPs (``model.blocks[l].mlp``): dense (torch's
    and the numba GEMV) and through each swap's sparse modules, one token at a time through
    every layer as in decoding; ``inputs[l]``: (tokens, d_model) the MLP inputs of layer l. The
    swaps must be of ``model``."""
    from sparsetrace.speed.decode import Swap

    if {"dense", GEMV} & set(swaps):
        raise ValueError(f"'dense' and {GEMV!r} name the baselines, not a sparse path")
    swaps = {GEMV: Swap.gemv(model), **swaps}
    tokens, mlps = inputs[0].shape[0], [block.mlp for block in model.blocks]
    rows = [[x[t : t + 1] for t in range(tokens)] for x in inputs]

    def run() -> None:
        current = [block.mlp for block in model.blocks]  # a swap may replace whole MLPs
        for t in range(tokens):
            for mlp, per_token in zip(current, rows, strict=True):
                mlp(per_token[t], False)

    def through(swap: Swap | None) -> Callable[[], None]:
        def call() -> None:
            for s in swaps.values():  # the swaps share the model's paths: all dense first
                s.use(sparse=False)
            if swap is not None:
                swap.use(sparse=True)
            run()

        return call

    for swap in swaps.values():  # count what the timed calls read, nothing before
        for module in swap.downs + swap.ups:
            module.reset_counts()
    calls = {"dense": through(None)} | {name: through(swap) for name, swap in swaps.items()}
    try:
        with torch.inference_mode():
            times = best_times(calls, repeats)
    finally:
        for swap in swaps.values():
            swap.use(sparse=False)
    n = tokens * len(mlps)
    dense_bytes = sum(4 * (m.w_in.weight.numel() + m.w_out.weight.numel())
                      for m in mlps) / len(mlps)  # fmt: skip
    out = []
    for name, swap in list(swaps.items())[1:]:
        downs, ups = swap.downs, swap.ups
        active = sum(d.read_fraction for d in downs) / len(downs)
        down_read = sum(d.read_fraction * d.d_model * d.d_ff * 4 for d in downs) / len(downs)
        if ups:
            up_read = sum(u.bytes_per_token for u in ups) / len(ups)
        else:  # read in full by the dense up projection
            up_read = sum(4 * m.w_in.weight.numel() for m in mlps) / len(mlps)
        candidates = sum(u.candidate_fraction for u in ups) / len(ups) if ups else 1.0
        out.append(PathTiming(name, active, candidates, times["dense"] / n, times[GEMV] / n,
                              times[name] / n, dense_bytes, up_read + down_read,
                              bandwidth))  # fmt: skip
    return out
