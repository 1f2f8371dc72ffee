"""The statistics behind the verdicts: estimates with standard errors, ties, orders, intervals.

Pure functions of numbers (numpy / scipy); no run directories, no report. Every interval is
two-sided at ``LEVEL`` unless its name says otherwise (the equivalence test uses the 90 %
interval that a TOST at alpha 0.05 corresponds to).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

LEVEL = 0.95
Z = float(stats.norm.ppf(0.5 + LEVEL / 2))  # 1.96


@dataclass(frozen=True)
class Estimate:
    """A value with its standard error (0: taken as exact, e.g. a published number) and how many
    measurements it rests on."""

    value: float
    se: float = 0.0
    n: int = 1

    def __str__(self) -> str:
        return f"{self.value:.3g} ± {self.se:.2g}" if self.se > 0 else f"{self.value:.3g}"


def binomial_se_pct(pct: float, units: int) -> float:
    """Standard error, in percentage points, of a share ``pct`` % of ``units`` units that each
    fall on either side independently (the seed-to-seed spread of a share of randomly initialised
    units)."""
    if units <= 0 or math.isnan(pct):
        return math.nan
    p = min(max(pct / 100, 0.0), 1.0)
    return 100 * math.sqrt(p * (1 - p) / units)


def window_estimate(values: Sequence[float]) -> Estimate:
    """Mean and standard error of the mean of repeated measurements (n >= 2), else the value."""
    x = np.asarray(values, float)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return Estimate(math.nan, math.nan, 0)
    if len(x) == 1:
        return Estimate(float(x[0]), 0.0, 1)
    return Estimate(float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x))), len(x))


def tie_margin(a: Estimate, b: Estimate, floor: float) -> float:
    """The smallest difference of ``a`` and ``b`` that is not a tie: Z standard errors of the
    difference, and never below ``floor`` (the precision the values are known to)."""
    return max(floor, Z * math.hypot(a.se, b.se))


def compare(a: Estimate, b: Estimate, floor: float) -> int:
    """+1 if a > b beyond the tie margin, -1 if a < b beyond it, 0 for a tie."""
    diff = a.value - b.value
    margin = tie_margin(a, b, floor)
    return 1 if diff > margin else -1 if diff < -margin else 0


@dataclass(frozen=True)
class Order:
    """Pairwise agreement with a claimed order: pairs in the claimed order, against it, tied.

    ``score`` = (agree - against) / pairs: Kendall's tau of the claim with ties counted as
    neither (1: every pair as claimed; 0: as many against as for, or all tied).
    """

    agree: int
    against: int
    ties: int

    @property
    def pairs(self) -> int:
        return self.agree + self.against + self.ties

    @property
    def score(self) -> float:
        return (self.agree - self.against) / self.pairs if self.pairs else math.nan

    def __str__(self) -> str:
        return (
            f"{self.agree} of {self.pairs} pairs as claimed, {self.against} against, "
            f"{self.ties} tied (score {self.score:+.2f})"
        )


def pairwise_order(values: Sequence[Estimate], floor: float) -> Order:
    """How well ``values`` (in the order the claim names) rise: for every pair i < j, does
    values[j] exceed values[i] beyond the tie margin? A falling claim passes negated values."""
    agree = against = ties = 0
    for i in range(len(values)):
        for j in range(i + 1, len(values)):
            c = compare(values[j], values[i], floor)
            agree += c > 0
            against += c < 0
            ties += c == 0
    return Order(agree, against, ties)


def negate(values: Sequence[Estimate]) -> list[Estimate]:
    return [Estimate(-v.value, v.se, v.n) for v in values]


@dataclass(frozen=True)
class Extreme:
    """Is ``target`` the highest of ``values``: how many others it beats, ties, loses to."""

    target: object
    beats: list[object]
    ties: list[object]
    loses: list[object]


def extreme(values: Mapping[object, Estimate], target: object, floor: float) -> Extreme:
    """``target`` against every other key: is it higher beyond the tie margin? (For 'lowest',
    pass negated values.)"""
    beats, ties, loses = [], [], []
    for key, v in values.items():
        if key == target:
            continue
        c = compare(values[target], v, floor)
        (beats if c > 0 else loses if c < 0 else ties).append(key)
    return Extreme(target, beats, ties, loses)


@dataclass(frozen=True)
class Correlation:
    r: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        interval = f"{LEVEL:.0%} CI [{self.low:+.2f}, {self.high:+.2f}]"
        return f"r = {self.r:+.2f}, {interval}, n = {self.n}"


def pearson_ci(x: Sequence[float], y: Sequence[float]) -> Correlation | None:
    """Pearson r with its Fisher-z confidence interval; None below 4 points or without
    variation (the interval needs n - 3 > 0)."""
    a, b = np.asarray(x, float), np.asarray(y, float)
    n = len(a)
    if n < 4 or a.std() == 0 or b.std() == 0:
        return None
    r = float(np.corrcoef(a, b)[0, 1])
    z = math.atanh(min(max(r, -0.999999), 0.999999))
    half = Z / math.sqrt(n - 3)
    return Correlation(r, math.tanh(z - half), math.tanh(z + half), n)


@dataclass(frozen=True)
class RateRatio:
    """Events per step in period b over events per step in period a, with an exact interval
    (conditional binomial, Clopper-Pearson). ``ratio`` is None when period a had no event (the
    point estimate is infinite; the lower bound is still finite)."""

    ratio: float | None
    low: float
    high: float


def rate_ratio(n_a: int, span_a: float, n_b: int, span_b: float) -> RateRatio | None:
    """None without any event (nothing to compare)."""
    total = n_a + n_b
    if total == 0 or span_a <= 0 or span_b <= 0:
        return None
    alpha = 1 - LEVEL
    # Given the total, n_b ~ Binomial(total, pi) with pi = span_b R / (span_b R + span_a).
    lo_pi = 0.0 if n_b == 0 else float(stats.beta.ppf(alpha / 2, n_b, total - n_b + 1))
    hi_pi = 1.0 if n_b == total else float(stats.beta.ppf(1 - alpha / 2, n_b + 1, total - n_b))
    scale = span_a / span_b

    def odds(p: float) -> float:
        return math.inf if p >= 1 else p / (1 - p) * scale

    ratio = None if n_a == 0 else (n_b / span_b) / (n_a / span_a)
    return RateRatio(ratio, odds(lo_pi), odds(hi_pi))


@dataclass(frozen=True)
class Difference:
    """mean(a) - mean(b) with Welch's standard error and degrees of freedom; intervals at
    ``LEVEL`` and at 90 % (the interval a TOST at alpha 0.05 corresponds to)."""

    diff: float
    se: float
    df: float
    n_a: int
    n_b: int
    pooled_sd: float  # sqrt of the mean of the two arms' variances

    def _half(self, level: float) -> float:
        return float(stats.t.ppf(0.5 + level / 2, self.df)) * self.se if self.se else 0.0

    @property
    def low(self) -> float:
        return self.diff - self._half(LEVEL)

    @property
    def high(self) -> float:
        return self.diff + self._half(LEVEL)

    @property
    def low90(self) -> float:
        return self.diff - self._half(0.9)

    @property
    def high90(self) -> float:
        return self.diff + self._half(0.9)

    @property
    def t(self) -> float:
        if self.se:
            return self.diff / self.se
        return math.copysign(math.inf, self.diff) if self.diff else 0.0

    @property
    def p(self) -> float:
        """Two-sided p-value of 'no difference'."""
        if not self.se:
            return 0.0 if self.diff else 1.0
        return float(2 * stats.t.sf(abs(self.t), self.df))

    def ci(self) -> str:
        return f"{LEVEL:.0%} CI [{self.low:+.4g}, {self.high:+.4g}]"


def welch(a: Sequence[float], b: Sequence[float]) -> Difference | None:
    """Welch's unequal-variance comparison; None unless both samples have two or more values."""
    x, y = np.asarray(a, float), np.asarray(b, float)
    if len(x) < 2 or len(y) < 2:
        return None
    va, vb = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se = math.sqrt(va + vb)
    pooled = math.sqrt((x.var(ddof=1) + y.var(ddof=1)) / 2)
    df = (va + vb) ** 2 / (va**2 / (len(x) - 1) + vb**2 / (len(y) - 1)) if se else math.inf
    return Difference(float(x.mean() - y.mean()), se, float(df), len(x), len(y), pooled)


def detectable_effect(n1: int, n2: int, power: float = 0.8) -> float:
    """Smallest difference, in standard deviations (Cohen's d), that a two-sided t-test at level
    1 - LEVEL detects with probability ``power`` (equal variances, noncentral t)."""
    if min(n1, n2) < 2:
        return math.nan
    df = n1 + n2 - 2
    crit = stats.t.ppf(0.5 + LEVEL / 2, df)
    scale = math.sqrt(1 / n1 + 1 / n2)
    return float(optimize.brentq(lambda d: stats.nct.sf(crit, df, d / scale) - power, 1e-6, 1e3))


def tost_p(d: Difference, margin: float) -> float:
    """p-value of the two one-sided tests of |true difference| >= margin (Welch); equivalence
    at alpha 0.05 is p < 0.05, i.e. the 90 % interval inside (-margin, margin)."""
    if d.se == 0:
        return 0.0 if abs(d.diff) < margin else 1.0
    p_low = float(stats.t.sf((d.diff + margin) / d.se, d.df))
    p_high = float(stats.t.cdf((d.diff - margin) / d.se, d.df))
    return max(p_low, p_high)


def seeds_for_equivalence(sd: float, margin: float, power: float = 0.8) -> int | None:
    """Seeds per arm for a TOST at alpha 0.05 to show equivalence within ``margin`` with
    probability ``power`` when the true difference is 0 and the seed-to-seed standard deviation
    is ``sd`` (t quantiles, iterated). None when sd is unknown."""
    if math.isnan(sd) or margin <= 0:
        return None
    if sd == 0:
        return 2
    for n in range(2, 10_000):
        df = 2 * n - 2
        se = sd * math.sqrt(2 / n)
        # Both one-sided tests reject when |diff| < margin - t_crit se; diff ~ t(df) se.
        reach = margin / se - float(stats.t.ppf(0.95, df))
        if reach > 0 and 2 * float(stats.t.cdf(reach, df)) - 1 >= power:
            return n
    return None


def seeds_to_exclude(sd: float, effect: float, threshold: float, power: float = 0.8) -> int | None:
    """Seeds per arm for the interval of a difference whose true value is ``effect`` to lie
    entirely on one side of ``threshold`` with probability ``power`` (two-sided level LEVEL)."""
    gap = abs(effect - threshold)
    if not sd > 0 or gap == 0:
        return None
    for n in range(2, 10_000):
        df = 2 * n - 2
        se = sd * math.sqrt(2 / n)
        crit = float(stats.t.ppf(0.5 + LEVEL / 2, df))
        if float(stats.t.cdf(gap / se - crit, df)) >= power:
            return n
    return None
