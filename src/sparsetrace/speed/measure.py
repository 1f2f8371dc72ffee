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

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsetrace.speed.sparse_down import DEFAULT_KERNEL, SparseDown

BANDWIDTH_BYTES = 1 << 30  # 1 GiB: larger than any last-level cache we run on


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
    """Bytes per second read from memory: the faster of a full reduction and a matrix-vector
    product over ``nbytes`` of float32 (torch's threads; GEMV reads faster than ``sum`` here, and
    the bound must not be one that a dense kernel beats)."""
    buffer = torch.ones(nbytes // 4, dtype=torch.float32)
    matrix = buffer.view(-1, 4096)
    vector = torch.ones(4096)
    fastest = min(best_time(buffer.sum, repeats), best_time(lambda: torch.mv(matrix, vector),
                                                             repeats))  # fmt: skip
    return buffer.numel() * 4 / fastest


@dataclass(frozen=True)
class MlpLayer:
    """One plain MLP's weights for timing: up (d_ff, d_model), down (d_model, d_ff) in
    ``nn.Linear``'s layout for the dense path, and the same down projection as a SparseDown."""

    up: Tensor
    down: Tensor
    sparse: SparseDown

    @classmethod
    def of(cls, up: Tensor, down: Tensor, kernel: str = DEFAULT_KERNEL) -> MlpLayer:
        up, down = up.detach().float().contiguous(), down.detach().float().contiguous()
        return cls(up, down, SparseDown(down, kernel=kernel))


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
    dense: float
    sparse: float
    bandwidth: float
    up_bytes: float  # per layer, mean over layers
    down_bytes: float

    @property
    def speedup(self) -> float:
        return self.dense / self.sparse

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
        return self.bound_dense / self.dense

    @property
    def oracle_bound_speedup(self) -> float:
        """If the active units were known before the up projection (a perfect predictor)."""
        return 1.0 / max(self.active, 1e-12)

    def row(self) -> dict[str, float]:
        return {
            "active fraction": self.active, "dense (us)": 1e6 * self.dense,
            "sparse (us)": 1e6 * self.sparse, "speed-up": self.speedup,
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

    def run(sparse: bool) -> None:
        for t in range(tokens):
            for layer, per_token in zip(layers, rows, strict=True):
                x, mask = per_token[t]
                h = F.linear(x, layer.up).abs_().mul_(mask)
                layer.sparse(h) if sparse else F.linear(h, layer.down)

    with torch.inference_mode():
        times = best_times({"dense": lambda: run(False), "sparse": lambda: run(True)}, repeats)
    dense, sparse = times["dense"], times["sparse"]
    calls, n = tokens * len(layers), len(layers)
    active = float(torch.stack([m.float().mean() for m in masks]).mean())
    up = sum(layer.up.numel() * layer.up.element_size() for layer in layers) / n
    down = sum(layer.down.numel() * layer.down.element_size() for layer in layers) / n
    return BlockTiming(active, dense / calls, sparse / calls, bandwidth, up, down)


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
