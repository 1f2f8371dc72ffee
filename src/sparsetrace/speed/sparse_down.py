"""A down projection that reads only the weight rows of the active hidden units.

Per token the MLP's down projection is ``y = W_out a``; with a few units active it is a weighted
sum of the active units' columns of ``W_out``. Stored unit-major (``W_out^T``, one contiguous row
per unit) that sum reads ``k * d_model`` weights instead of ``d_ff * d_model``. Which units count
as active: nonzero (ReLU: exact) or, with the layer's CETT threshold ``tau``, the Sparsing Law's
rule ``|a| * ||W_out[:, i]|| >= tau`` (the test of :func:`sparsetrace.sparsing.cett.kept`, so the
truncated model is the one PPL-p% measured).

Two kernels, chosen by measurement (results/bench-sparse-primitives.md):

- ``numba`` (default): one compiled parallel loop; each thread lists the active units of its
  consecutive chunk of the units and sums their rows eight at a time (eight memory streams in
  flight: each unit-major row is a 4 KiB page that the hardware prefetcher must pick up anew)
  into its partial sum (:func:`sparsetrace.speed.kernels.sparse_rows_matvec`). Faster than
  ``embedding_bag`` at every active fraction measured (2-100 %).
- ``embedding_bag``: ``F.embedding_bag(mode="sum", per_sample_weights=...)`` sums weighted rows
  without copying them. It parallelises over bags only, so the output columns are split into one
  block per thread (the table stored block-major) and each token is that many bags; a compiled
  loop (:func:`sparsetrace.speed.kernels.bag_indices`) finds the active units and writes the
  bags' indices in one call (built from torch operators the same indices cost ~30 us per call).

Batches larger than ``max_rows`` tokens take one dense matrix product instead (prefill; batches
whose union of active units makes gathering pointless); ``reads.fallbacks`` counts them.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsetrace.sites import down_weight
from sparsetrace.sparsing.cett import kept

MAX_ROWS = 16  # tokens per call up to which the sparse path is used: it beat dense up to 16
# tokens on GPT-2-medium's shape (results/bench-small-batch.md); prefill takes the dense product
KERNELS = ("embedding_bag", "numba")
DEFAULT_KERNEL = "numba"  # faster at every fraction measured (results/bench-sparse-primitives.md)


@dataclass(slots=True)
class Reads:
    """What a sparse module read so far, kept outside nn.Module's attributes (every write to one
    of those runs its checks for parameters, buffers and submodules: microseconds, at every
    layer and token)."""

    calls: int = 0  # calls on the sparse path
    tokens: int = 0  # tokens on those calls
    rows: int = 0  # float32 rows read: SparseDown (token, unit) rows; SparseUp the first half's
    second_rows: int = 0  # SparseUp, gated: rows of the up half
    fallbacks: int = 0  # calls that took the dense product


class NumpyViews(nn.Module):
    """A module whose kernels read numpy views of its buffers, made once (``.numpy()`` costs ~1 us
    a call, and a layer makes several) and dropped when torch moves, converts or loads them."""

    _views: dict[str, np.ndarray] | None = None

    def views(self) -> dict[str, np.ndarray]:
        if self._views is None:
            self._views = {name: t.numpy() for name, t in self.viewed().items()}
        return self._views

    def viewed(self) -> dict[str, Tensor]:
        """The tensors to view, by name."""
        raise NotImplementedError

    def _apply(self, fn, recurse=True):  # .to(), .float(), ... may replace the buffers
        self._views = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # assign=True replaces them
        self._views = None
        super()._load_from_state_dict(*args, **kwargs)


class SparseDown(NumpyViews):
    """``y = W a + b`` for ``a`` (..., d_ff), reading only the rows of active units.

    ``weight``: (d_model, d_ff) as in ``nn.Linear``; ``tau``: the layer's CETT threshold (None:
    exact, nonzero units only); float32 weights (the kernels' dtype on CPU)."""

    def __init__(
        self, weight: Tensor, bias: Tensor | None = None, tau: float | None = None,
        max_rows: int = MAX_ROWS, kernel: str = DEFAULT_KERNEL, blocks: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}; got {kernel!r}")
        weight = weight.detach().float()
        self.d_model, self.d_ff = weight.shape
        self.kernel, self.tau, self.max_rows = kernel, tau, max_rows
        threads = max(1, torch.get_num_threads())
        self.blocks = (blocks or threads) if kernel == "embedding_bag" else 1
        self.width = -(-self.d_model // self.blocks)
        padded = F.pad(weight.t(), (0, self.width * self.blocks - self.d_model))
        table = padded.reshape(self.d_ff, self.blocks, self.width).transpose(0, 1)
        self.register_buffer("table", table.reshape(self.blocks * self.d_ff, self.width)
                             .contiguous())  # fmt: skip
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.register_buffer("norms", weight.norm(dim=0))  # ||W[:, i]||, as unit_norms has it
        self.warned = False  # the dense fallback is announced once per projection
        self.reset_counts()

    def viewed(self) -> dict[str, Tensor]:
        views = {"table": self.table, "norms": self.norms}
        return views if self.bias is None else views | {"bias": self.bias}

    def reset_counts(self) -> None:
        """Zero the counts (:class:`Reads`: ``rows`` the (token, unit) rows read, the bound's
        input)."""
        self.reads = Reads()

    @classmethod
    def from_module(cls, module: nn.Module, **options) -> SparseDown:
        """From an ``nn.Linear`` or a GPT-2 ``Conv1D`` (weight stored (in, out))."""
        return cls(down_weight(module), getattr(module, "bias", None), **options)

    def dense_weight(self) -> Tensor:
        """(d_model, d_ff): the weight as given."""
        table = self.table.view(self.blocks, self.d_ff, self.width).transpose(0, 1)
        return table.reshape(self.d_ff, -1)[:, : self.d_model].t()

    @property
    def read_fraction(self) -> float:
        """Mean fraction of the units read per token on the sparse path so far (nan: none)."""
        reads = self.reads
        return reads.rows / (reads.tokens * self.d_ff) if reads.tokens else math.nan

    def active(self, rows: Tensor) -> Tensor:
        """Which entries of ``rows`` (n, d_ff) the projection reads."""
        if self.tau is None:
            return rows != 0
        return kept(rows.float().abs() * self.norms, self.tau)

    def forward(self, a: Tensor) -> Tensor:
        shape = a.shape
        rows = a.detach().reshape(-1, self.d_ff).float()  # an inference path: no gradient
        if rows.shape[0] > self.max_rows:
            if not self.warned:
                self.warned = True
                warnings.warn(
                    f"SparseDown: {rows.shape[0]} tokens in one call (more than max_rows="
                    f"{self.max_rows}) run as one dense product: per-token gathering does not pay "
                    "for batches (prefill is expected to)",
                    stacklevel=4,  # past nn.Module's call machinery, to the caller
                )
            self.reads.fallbacks += 1
            out = self._dense(rows if self.tau is None else rows * self.active(rows))
        else:
            out = self._numba(rows) if self.kernel == "numba" else self._bags(rows)
            self.reads.calls += 1
            self.reads.tokens += rows.shape[0]
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.d_model).to(a.dtype)

    def _dense(self, rows: Tensor) -> Tensor:
        table = self.table.view(self.blocks, self.d_ff, self.width)
        out = torch.matmul(rows, table)  # (blocks, n, width)
        return out.transpose(0, 1).reshape(rows.shape[0], -1)[:, : self.d_model]

    def _numba(self, rows: Tensor) -> Tensor:
        import numba

        from sparsetrace.speed.kernels import sparse_rows_matvec

        views = self.views()
        tau = np.float32(-1.0 if self.tau is None else self.tau)  # compared as torch does
        out = np.empty((rows.shape[0], self.d_model), np.float32)
        self.reads.rows += sparse_rows_matvec(rows.contiguous().numpy(), views["table"],
                                              views["norms"], tau, out,
                                              numba.get_num_threads())  # fmt: skip
        return torch.from_numpy(out)

    def _bags(self, rows: Tensor) -> Tensor:
        from sparsetrace.speed.kernels import bag_indices

        tau = np.float32(-1.0 if self.tau is None else self.tau)
        index, weights, offsets = bag_indices(rows.contiguous().numpy(), self.norms.numpy(), tau,
                                              self.blocks, self.d_ff)  # fmt: skip
        self.reads.rows += len(index) // self.blocks
        out = F.embedding_bag(torch.from_numpy(index), self.table, torch.from_numpy(offsets),
                              mode="sum", per_sample_weights=torch.from_numpy(weights))  # fmt: skip
        return out.reshape(rows.shape[0], -1)[:, : self.d_model]
