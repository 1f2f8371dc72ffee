"""The baselines the Sparsing Law compares PPL-p% sparsity with: Top-k and FAT-ε.

Both are truncation rules (:class:`~sparsetrace.sparsing.truncation.Rule`) evaluated exactly like
the CETT thresholds (same passes, activation ratio and PPL ratio), so a report can put the three
side by side, at a given parameter or at the same PPL ratio (:func:`match_ppl`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from sparsetrace.sparsing.search import C_TOL, PPL_TOL, Subject, bisect, target_ratio
from sparsetrace.sparsing.truncation import Rule

Baseline = Literal["topk", "fat"]
_MAX_DOUBLINGS = 64  # FAT: eps doubles from 1 until the PPL target is passed


@dataclass(frozen=True)
class TopK:
    """Keep the k largest |a| of each token, zero the rest (Sparsing Law, baselines: Top-k)."""

    k: int

    def keep(self, h: Tensor, w_out: Tensor) -> Tensor:
        mask = torch.zeros_like(h, dtype=torch.bool)
        k = min(max(self.k, 0), h.shape[-1])
        return mask.scatter_(-1, h.abs().topk(k, dim=-1).indices, True) if k else mask


@dataclass(frozen=True)
class Fat:
    """Zero every entry with |a| < eps (Sparsing Law, baselines: FAT-ε)."""

    eps: float

    def keep(self, h: Tensor, w_out: Tensor) -> Tensor:
        return h.abs() >= self.eps


@dataclass(frozen=True)
class BaselinePoint:
    """A baseline at one parameter: Top-k's kept fraction of d_ff, or FAT's eps."""

    baseline: Baseline
    param: float
    activation_ratio: float  # mean over layers, truncated pass
    ppl_ratio: float
    layers: dict[str, float]  # per-layer activation ratio


def baseline_rules(subject: Subject, baseline: Baseline, param: float) -> dict[str, Rule]:
    """Per-layer rules: ``topk`` keeps ``round(param * d_ff)`` units, ``fat`` uses eps = param."""
    if baseline == "topk":
        return {name: TopK(round(param * m.in_features)) for name, m in subject.down.items()}
    if baseline == "fat":
        return dict.fromkeys(subject.down, Fat(param))
    raise ValueError(f"unknown baseline {baseline!r} (topk, fat)")


def evaluate_baseline(subject: Subject, baseline: Baseline, param: float) -> BaselinePoint:
    ev = subject.evaluate(baseline_rules(subject, baseline, param))
    return BaselinePoint(
        baseline=baseline, param=param, activation_ratio=ev.mean_activation_ratio,
        ppl_ratio=subject.ppl_ratio(ev), layers=dict(ev.activation_ratio),
    )  # fmt: skip


def match_ppl(subject: Subject, baseline: Baseline, p: float = 1.0) -> BaselinePoint:
    """The baseline's parameter at which the PPL ratio is 1 + p/100 (same tolerance as
    :func:`~sparsetrace.sparsing.search.find_cett`): Top-k bisects its kept fraction in [0, 1]
    (the ratio falls as it grows), FAT bisects eps in [0, hi], hi doubled from 1 until past it."""
    target = target_ratio(p)

    def ratio(param: float) -> float:
        return evaluate_baseline(subject, baseline, param).ppl_ratio

    tol = PPL_TOL * (target - 1.0)
    if baseline == "topk":
        found = bisect(ratio, 0.0, 1.0, target, tol, C_TOL, increasing=False)
    else:
        hi = 1.0
        for _ in range(_MAX_DOUBLINGS):
            if ratio(hi) >= target:
                break
            hi *= 2
        found = bisect(ratio, 0.0, hi, target, tol, C_TOL * hi)
    return evaluate_baseline(subject, baseline, found.x)
