"""The Sparsing Law's direction over training as a decision rule (``sparsing_direction``).

Sparsing Law (Luo et al.): with PPL-p% sparsity, ReLU's activation ratio falls over training and
SiLU's rises. A run's curve moves one way when the least-squares slope against ln(tokens) and the
means of its first and last half of checkpoints agree (:class:`Trend`); the finding holds when
every run moves as its family should and both families ran.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sparsetrace.claims.rules import direction
from sparsetrace.claims.verdict import FAILS, HOLDS, INCONCLUSIVE, NA, Verdict
from sparsetrace.sparsing.laws import LawFit

EXPECTED = {"relu": "falls", "silu": "rises"}  # Sparsing Law: direction over training, by form


@dataclass(frozen=True)
class Curve:
    """One run's activation ratio (mean of layers, PPL-p%) against training tokens, and the
    Sparsing Law form fitted to it (``fit`` None: ``note`` says why)."""

    label: str
    form: str  # 'relu' or 'silu'
    tokens: np.ndarray
    ratio: np.ndarray
    fit: LawFit | None
    note: str = ""


@dataclass(frozen=True)
class Trend:
    """Direction of an activation-ratio curve: least-squares slope of the ratio against
    ln(tokens), and the mean ratio over the first and the last half of the checkpoints (the
    middle one left out when their number is odd)."""

    slope: float
    first: float
    last: float

    @property
    def direction(self) -> str:
        """'falls' or 'rises' when the slope and the halves agree, else 'mixed'."""
        if self.slope < 0 and self.last < self.first:
            return "falls"
        if self.slope > 0 and self.last > self.first:
            return "rises"
        return "mixed"

    def __str__(self) -> str:
        return (
            f"slope {self.slope:+.4f} per ln(tokens), first half {self.first:.4f} -> "
            f"last half {self.last:.4f}"
        )


def trend(tokens: np.ndarray, ratio: np.ndarray) -> Trend | None:
    """The :class:`Trend` of a curve; None with fewer than two checkpoints."""
    order = np.argsort(tokens)
    x, y = np.log(np.asarray(tokens, float)[order]), np.asarray(ratio, float)[order]
    if len(y) < 2:
        return None
    half = len(y) // 2
    slope = float(np.polyfit(x, y, 1)[0])
    return Trend(slope, float(y[:half].mean()), float(y[len(y) - half :].mean()))


def curve_verdict(curve: Curve) -> Verdict:
    """Does this run move the way the Sparsing Law says its activation family does?"""
    t = trend(curve.tokens, curve.ratio)
    if t is None:
        return Verdict(NA, f"{len(curve.ratio)} checkpoint(s): no trend", "two or more checkpoints")
    expected = EXPECTED[curve.form]
    outcome = direction(t.slope, t.first, t.last, expected)
    return Verdict(outcome, f"{t.direction} (expected: {expected}); {t}")


def check_finding(curves: list[Curve]) -> Verdict:
    """Sparsing Law: ReLU's activation ratio falls over training, SiLU's rises (rule
    ``sparsing_direction``): holds when every run moves as stated and both families ran, does
    not hold when any run moves the other way, inconclusive otherwise."""
    verdicts = {c.label: curve_verdict(c) for c in curves}
    checked = {k: v for k, v in verdicts.items() if v.outcome != NA}
    if not checked:
        return Verdict(NA, "no run has two checkpoints", "two or more checkpoints per run")
    evidence = "; ".join(f"{k}: {v.evidence}" for k, v in checked.items())
    forms = {c.form for c in curves if c.label in checked}
    if any(v.outcome == FAILS for v in checked.values()):
        return Verdict(FAILS, evidence)
    if forms != set(EXPECTED):
        return Verdict(INCONCLUSIVE, evidence, "runs of both families (relu-like and silu-like)")
    if all(v.outcome == HOLDS for v in checked.values()):
        return Verdict(HOLDS, evidence)
    return Verdict(INCONCLUSIVE, evidence, "more checkpoints (slope and halves disagree)")
