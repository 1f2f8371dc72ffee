"""CETT (cumulative errors of tail truncation) and the per-layer threshold for a target CETT.

Paper: Luo et al., *Sparsing Law* (arXiv 2411.02335); definitions in docs/sparsing-law.md.

All functions take the hidden activation ``a`` of one MLP layer, shape (..., d_ff) (the input of
the down projection, plain or gated: ``act(W_in x)`` or ``act(W_gate x) * (W_up x)``), the down
projection's weight ``w_out`` (d_model, d_ff) and an optional validity mask of shape
``a.shape[:-1]`` (true for real tokens; padding is excluded everywhere).

Thresholds for a target CETT are found without re-running the model: :class:`ThresholdGrid`
collects candidate thresholds from the activations (quantiles of the positive unit norms), and
:class:`CettCurve` evaluates CETT at *every* candidate in one streaming pass over token chunks. The
threshold for any target is then a lookup, exact on the grid (see :meth:`CettCurve.threshold`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

GRID_SIZE = 65536  # candidate thresholds per layer, as many as the public code's grid
SAMPLE_SIZE = 1 << 20  # unit norms kept per layer to place the candidates (quantiles)
DEAD_FRACTION = 1e-3  # a unit active on fewer than 0.1% of the tokens is dead
_CHUNK_ELEMENTS = 1 << 22  # (tokens, d_ff, d_model) elements per chunk of CettCurve.update


def unit_norms(a: Tensor, w_out: Tensor) -> Tensor:
    """n[t, i] = |a[t, i]| * ||W_out[:, i]||_2, in float32.

    Sparsing Law, "Tensors": the size of unit i's contribution to the layer output.
    """
    return a.float().abs() * w_out.float().norm(dim=0)


def kept(n: Tensor, tau: float | Tensor) -> Tensor:
    """Entries that stay active under threshold tau: ``n >= tau`` and nonzero.

    Truncation drops ``n < tau``; a zero entry is never counted as active, so at ``tau = 0`` the
    activation ratio of a ReLU layer is its plain nonzero fraction.
    """
    return (n >= tau) & (n > 0)


def is_dead(active: Tensor, tokens: int, min_frac: float = DEAD_FRACTION) -> Tensor:
    """Units active on fewer than ``min_frac`` of ``tokens`` (active: per-unit token counts).

    Sparsing Law, "Dead neuron": activated on fewer than 0.1% of the validation tokens.
    """
    return active < min_frac * tokens


def _rows(a: Tensor, mask: Tensor | None) -> Tensor:
    """The valid tokens of ``a`` as rows (tokens, d_ff), float32."""
    rows = a.reshape(-1, a.shape[-1])
    if mask is not None:
        if mask.shape != a.shape[:-1]:
            shape = tuple(a.shape[:-1])
            raise ValueError(f"mask shape {tuple(mask.shape)} != activations' {shape}")
        rows = rows[mask.reshape(-1).to(device=a.device, dtype=torch.bool)]
    if rows.shape[0] == 0:
        raise ValueError("no valid tokens")
    return rows.float()


def _relative(tail: Tensor, out: Tensor) -> Tensor:
    """||tail|| / ||W_out a||; a token whose dense output is exactly zero contributes 0."""
    return torch.where(out > 0, tail / out.clamp_min(torch.finfo(out.dtype).tiny), 0.0)


def cett(a: Tensor, w_out: Tensor, tau: float | Tensor, mask: Tensor | None = None) -> Tensor:
    """CETT of one layer at threshold(s) tau: float64 tensor of tau's shape.

    Sparsing Law, "CETT": ``mean_t ||sum_{i: n[t,i] < tau} a[t,i] W_out[:, i]|| / ||W_out a[t]||``.
    The direct definition, one matmul per threshold; :class:`CettCurve` is the fast path.
    """
    rows, w = _rows(a, mask), w_out.float()
    n = unit_norms(rows, w)
    out = (rows @ w.T).norm(dim=-1)
    taus = torch.as_tensor(tau, dtype=torch.float32)
    values = [
        _relative(((rows * (n < t)) @ w.T).norm(dim=-1), out).double().mean()
        for t in taus.reshape(-1).tolist()
    ]
    return torch.stack(values).reshape(taus.shape)


def activation_ratio(
    a: Tensor, w_out: Tensor, tau: float | Tensor, mask: Tensor | None = None
) -> float:
    """Fraction of valid (token, unit) pairs active under tau (1 - sparsity, Sparsing Law)."""
    rows = _rows(a, mask)
    return float(kept(unit_norms(rows, w_out), tau).double().mean())


def dead_units(
    a: Tensor,
    w_out: Tensor,
    tau: float | Tensor,
    mask: Tensor | None = None,
    min_frac: float = DEAD_FRACTION,
) -> Tensor:
    """Bool (d_ff,): units active under tau on fewer than ``min_frac`` of the valid tokens."""
    rows = _rows(a, mask)
    active = kept(unit_norms(rows, w_out), tau).sum(0)
    return is_dead(active, rows.shape[0], min_frac)


class ThresholdGrid:
    """Candidate thresholds of one layer, from a streaming pass over its activations.

    Keeps the exact minimum and maximum positive unit norm and a uniform random sample of the
    positive norms (at most ``sample`` values, seeded); :meth:`grid` is their quantiles. Zeros are
    left out: a zero entry is dropped at every threshold and changes no output.
    """

    def __init__(self, w_out: Tensor, sample: int = SAMPLE_SIZE, seed: int = 0) -> None:
        self.w_out, self.sample = w_out.detach(), sample
        self.gen = torch.Generator().manual_seed(seed)
        self.values: list[Tensor] = []
        self.lo, self.hi = float("inf"), 0.0

    def update(self, a: Tensor, mask: Tensor | None = None) -> None:
        n = unit_norms(_rows(a, mask), self.w_out).reshape(-1)
        pos = n[n > 0]
        if pos.numel() == 0:
            return
        self.lo, self.hi = min(self.lo, float(pos.min())), max(self.hi, float(pos.max()))
        self.values.append(self._pick(pos, self.sample))
        if sum(v.numel() for v in self.values) > 2 * self.sample:  # bounded memory: thin out
            self.values = [self._pick(torch.cat(self.values), self.sample)]

    def _pick(self, values: Tensor, k: int) -> Tensor:
        if values.numel() <= k:
            return values
        idx = torch.randint(values.numel(), (k,), generator=self.gen).to(values.device)
        return values[idx]

    def grid(self, size: int = GRID_SIZE) -> Tensor:
        """Ascending candidates: the sample's quantiles at ``size`` levels, the exact positive
        minimum (drops exactly the zeros) and maximum. All-zero layer: ``[0]``."""
        if not self.values:
            return torch.zeros(1, device=self.w_out.device)
        s = torch.cat(self.values).sort().values
        pick = torch.linspace(0, s.numel() - 1, min(size, s.numel()), device=s.device).round()
        ends = torch.tensor([self.lo, self.hi], device=s.device)
        return torch.cat([ends, s[pick.long()]]).unique()


@dataclass(frozen=True)
class CettThreshold:
    """A layer's threshold for a target CETT and what it gives on the dense activations.

    ``ratio_gap``: the fraction of (token, unit) pairs between ``tau`` and the next candidate, an
    upper bound on how much the exact (off-grid) largest threshold would lower the ratio.
    """

    tau: float
    cett: float
    activation_ratio: float
    ratio_gap: float


class CettCurve:
    """CETT and activation ratio of one layer at every candidate threshold, streamed over tokens.

    Per token, the units sorted by n are dropped one by one; the tail after dropping the r
    smallest is the prefix sum of their contributions ``a[t, i] W_out[:, i]``, so one cumulative
    sum gives the token's relative tail norm at *every* threshold. Each unit's increment of that
    norm is added to the first candidate that drops it; a cumulative sum over candidates then
    gives CETT exactly at each of them. Cost per token: (nonzero units) * d_model, at most one
    down projection's worth (zero entries, which sort first, are skipped: they change no tail;
    ``skip_zeros=False`` accumulates every column, the reference the tests and
    ``benchmarks/cett_curve_bench.py`` compare with); memory: chunks of ``chunk_elements``;
    nothing of the activations is kept.
    """

    def __init__(
        self, w_out: Tensor, grid: Tensor, chunk_elements: int = _CHUNK_ELEMENTS,
        skip_zeros: bool = True,
    ) -> None:  # fmt: skip
        self.w_out, self.skip_zeros = w_out.detach(), skip_zeros
        self.wt = self.w_out.float().T.contiguous()  # (d_ff, d_model)
        self.grid = grid.float().to(self.wt.device)
        self.units, d_model = self.wt.shape
        self.chunk = max(1, chunk_elements // (self.units * d_model))
        size = self.grid.numel() + 1
        self.tail = torch.zeros(size, dtype=torch.float64, device=self.wt.device)
        self.dropped = torch.zeros(size, dtype=torch.int64, device=self.wt.device)
        self.tokens = 0

    def freeze(self) -> None:
        """Done streaming: drop the weight and its float32 copy (the curve keeps its
        ``GRID_SIZE + 1`` numbers per layer), so that a measured model costs no second copy."""
        self.w_out = self.wt = None

    def update(self, a: Tensor, mask: Tensor | None = None) -> None:
        if self.wt is None:
            raise RuntimeError("CettCurve.update after freeze()")
        rows = _rows(a, mask).to(self.wt.device)
        for x in rows.split(self.chunk):
            n, order = unit_norms(x, self.w_out).sort(dim=-1)
            # Zero entries sort first and add nothing to any tail: only the last `live` columns
            # (the most nonzeros of any token in the chunk) are accumulated — for ReLU-like
            # activations a fraction of the d_ff * d_model work, with the same sums.
            live = int((n != 0).sum(-1).max()) if self.skip_zeros else n.shape[1]
            skipped = n.shape[1] - live
            self.dropped[0] += skipped * x.shape[0]  # zeros: dropped at every candidate
            if live == 0:
                continue
            n, order = n[:, skipped:].contiguous(), order[:, skipped:].contiguous()
            contrib = self.wt.index_select(0, order.reshape(-1)).view(*order.shape, -1)
            contrib.mul_(x.gather(1, order).unsqueeze(-1))
            norms = contrib.cumsum_(1).norm(dim=-1)  # (chunk, d_ff): tail after dropping r+1
            rel = _relative(norms, norms[:, -1:])  # dropping all units leaves the whole output
            step = torch.diff(rel, dim=1, prepend=torch.zeros_like(rel[:, :1]))
            # candidate index that first drops each entry: n < grid[j]; zeros always dropped
            first = torch.searchsorted(self.grid, n, right=True).masked_fill_(n == 0, 0)
            self.tail.index_add_(0, first.reshape(-1), step.reshape(-1).double())
            self.dropped += torch.bincount(first.reshape(-1), minlength=self.dropped.numel())
        self.tokens += rows.shape[0]

    @property
    def cett(self) -> Tensor:
        """CETT at each candidate (float64, grid's shape)."""
        return self.tail.cumsum(0)[:-1] / max(self.tokens, 1)

    @property
    def activation_ratio(self) -> Tensor:
        """Activation ratio at each candidate (float64, grid's shape)."""
        total = max(self.tokens * self.units, 1)
        return 1.0 - self.dropped.cumsum(0)[:-1].double() / total

    def threshold(self, c: float) -> CettThreshold:
        """The largest candidate tau with CETT(tau) <= c (exact on the grid: no candidate above
        it qualifies, even where CETT is not monotone)."""
        if not self.tokens:
            raise ValueError("CettCurve has seen no tokens")
        curve = self.cett
        ok = (curve <= c).nonzero()
        if ok.numel() == 0:
            raise ValueError(f"no threshold reaches CETT <= {c}")
        j = int(ok[-1])
        return CettThreshold(
            tau=float(self.grid[j]),
            cett=float(curve[j]),
            activation_ratio=float(self.activation_ratio[j]),
            ratio_gap=float(self.dropped[j + 1]) / (self.tokens * self.units),
        )


def threshold_for_cett(
    a: Tensor, w_out: Tensor, c: float, mask: Tensor | None = None, grid_size: int = GRID_SIZE
) -> CettThreshold:
    """The layer's threshold for target CETT c: largest tau with CETT(tau) <= c.

    Sparsing Law, "CETT": searched on ``grid_size`` quantiles of the positive unit norms (all
    distinct values when there are fewer), CETT evaluated exactly at each candidate.
    """
    sampler = ThresholdGrid(w_out)
    sampler.update(a, mask)
    curve = CettCurve(w_out, sampler.grid(grid_size))
    curve.update(a, mask)
    return curve.threshold(c)
