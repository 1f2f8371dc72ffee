"""Sampling uncertainty of PPL-p% sparsity: bootstraps over the evaluated sequences.

Two standard errors of the activation ratio, both from the same resamples of the evaluation
set's sequences (1,000, fixed seed):

- **at fixed c** (:func:`ratio_se`): the thresholds stay where the search put them; only the
  pooled ratio is resampled. It leaves out that c was searched on the same tokens.
- **with the search** (:func:`search_bootstrap`): every resample also solves
  ``PPL ratio(c) = 1 + p/100`` again, on its own losses, along the c values the search evaluated
  (piecewise linear between them; c = 0 is the dense model, PPL ratio 1), and takes the ratio at
  its own c. Measured on the ``cpu`` model: the whole measurement repeated on 12 disjoint random
  token sets spread 0.67x this SE (conservative) and 4x the fixed-c SE (results/sparsing-law-token-
  spread-cpu.md). It keeps the per-layer thresholds' family along c as measured on these tokens.

A resample whose PPL ratio does not reach the target within the evaluated c is clipped to the
last c and counted in ``clipped``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 1000


@dataclass(frozen=True)
class SequenceStats:
    """One pass over an evaluation set, per sequence: summed loss over its targets, its targets,
    and per layer its active (token, unit) pairs and valid tokens; ``widths`` are the layers'
    units."""

    loss: np.ndarray  # (n,)
    targets: np.ndarray  # (n,)
    active: np.ndarray  # (layers, n)
    tokens: np.ndarray  # (layers, n)
    widths: np.ndarray  # (layers,)

    @property
    def n(self) -> int:
        return len(self.targets)

    def mean_loss(self, weights: np.ndarray) -> np.ndarray:
        """Per resample (rows of ``weights``, counts per sequence): the pooled mean loss."""
        return (weights @ self.loss) / np.maximum(weights @ self.targets, 1)

    def activation_ratio(self, weights: np.ndarray) -> np.ndarray:
        """Per resample: the pooled activation ratio, averaged over layers."""
        pairs = (weights @ self.tokens.T) * self.widths
        return ((weights @ self.active.T) / np.maximum(pairs, 1)).mean(-1)


def resample_weights(n: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """(resamples, n) counts: how often each of n sequences is drawn in each bootstrap resample
    (n draws with replacement; fixed seed, so every pass is resampled alike)."""
    picks = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    counts = np.zeros((resamples, n))
    np.add.at(counts, (np.arange(resamples)[:, None], picks), 1.0)
    return counts


def ratio_se(stats: SequenceStats, resamples: int = RESAMPLES) -> float:
    """SE of the activation ratio at fixed thresholds (NaN below two sequences)."""
    if stats.n < 2 or not len(stats.widths):
        return float("nan")
    return float(stats.activation_ratio(resample_weights(stats.n, resamples)).std(ddof=1))


@dataclass(frozen=True)
class SearchBootstrap:
    """The resamples' own c and activation ratio at PPL ratio = target."""

    c: np.ndarray  # (resamples,)
    ratio: np.ndarray  # (resamples,)
    clipped: float  # share of resamples whose crossing lies outside the evaluated c

    @property
    def se(self) -> float:
        return float(self.ratio.std(ddof=1))

    def c_interval(self, level: float = 0.95) -> tuple[float, float]:
        q = (1 - level) / 2
        return float(np.quantile(self.c, q)), float(np.quantile(self.c, 1 - q))


def cross(cs: np.ndarray, ppl: np.ndarray, ratio: np.ndarray, target: float) -> SearchBootstrap:
    """Per resample (rows): the c where the PPL ratio, linear between the evaluated ``cs``
    (increasing), first reaches ``target``, and the activation ratio there (linear too); a row
    already at the target at the first c is clipped to it, one that never reaches it to the last."""
    reached = ppl >= target
    j = np.where(reached.any(1), reached.argmax(1), len(cs))  # first evaluated c at the target
    hi = np.clip(j, 1, len(cs) - 1)
    lo = hi - 1
    rows = np.arange(len(ppl))
    t = np.where(j == 0, 0.0, 1.0)  # the clipped rows: the first or the last c
    inside = (j > 0) & (j < len(cs))  # there ppl[lo] < target <= ppl[hi]
    p_lo, p_hi = ppl[rows, lo][inside], ppl[rows, hi][inside]
    t[inside] = (target - p_lo) / (p_hi - p_lo)
    c = cs[lo] + t * (cs[hi] - cs[lo])
    a = ratio[rows, lo] + t * (ratio[rows, hi] - ratio[rows, lo])
    return SearchBootstrap(c=c, ratio=a, clipped=float((~inside).mean()))


def search_bootstrap(
    dense: Sequence[SequenceStats],
    probes: Sequence[dict[float, SequenceStats]],
    target: float,
    resamples: int = RESAMPLES,
) -> list[SearchBootstrap]:
    """The search for c redone on each resample, for one or several models evaluated on the same
    sequences (``dense[i]``, and ``probes[i][c]`` for every c the search evaluated): the PPL ratio
    is averaged over the models, as in :func:`~sparsetrace.sparsing.search.find_cett`; one result
    per model, all with the same resampled c. c = 0 is added as the dense model itself. Below two
    sequences there is nothing to resample: the ratios are NaN."""
    n = dense[0].n
    probed = set.intersection(*(set(p) for p in probes)) - {0.0}
    if not probed:
        raise ValueError("no c > 0 evaluated on every model: run the search first")
    cs = np.array(sorted({0.0, *probed}))
    weights = resample_weights(n, resamples)
    base = [d.mean_loss(weights) for d in dense]

    def at(i: int, c: float) -> SequenceStats:
        return dense[i] if c == 0.0 else probes[i][c]

    ppl = np.mean([
        np.stack([np.exp(at(i, c).mean_loss(weights) - base[i]) for c in cs], axis=1)
        for i in range(len(dense))
    ], axis=0)  # fmt: skip
    out = [
        cross(cs, ppl, np.stack([at(i, c).activation_ratio(weights) for c in cs], axis=1), target)
        for i in range(len(dense))
    ]
    if n < 2:
        out = [SearchBootstrap(b.c, np.full_like(b.ratio, np.nan), b.clipped) for b in out]
    return out
