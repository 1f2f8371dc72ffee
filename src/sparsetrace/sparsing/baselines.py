"""The baselines the Sparsing Law compares PPL-p% sparsity with: Top-k and FAT-ε.

Both are truncation rules (:class:`~sparsetrace.sparsing.truncation.TruncationRule`) evaluated
exactly like the CETT thresholds (same passes, activation ratio and PPL ratio), so a report can put
the three side by side, at a given parameter or at the same PPL ratio (:func:`match_ppl`), each with
the uncertainty of its activation ratio with its own search redone on bootstrap resamples of the
sequences (the resamples are the same for every method, so differences are paired).

Two definitions (``definition``):
- ``reference`` (the default): the public code's (thunlp/SparsingLaw ``src/model_utils.py``).
  Both decide on the gate activation ``act(gate)`` of a gated MLP (the hidden activation of a
  plain one); Top-k keeps the largest fraction ``k`` of ``|act(gate)|`` over the *whole batch*
  tensor (batch x seq x d_ff, one threshold for all tokens), FAT-ε zeroes ``|act(gate)| < ε``.
  ε values compare with the paper's.
- ``ours``: the same rules on the product ``act(gate) * up`` that the down projection sees, Top-k
  per token (``round(k * d_ff)`` units each). Equal to ``reference`` for plain MLPs except for
  Top-k's scope.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from sparsetrace.sparsing.search import (
    C_TOL,
    PPL_TOL,
    REFINE_QUANTILES,
    Evaluation,
    Subject,
    bisect,
    target_ratio,
)
from sparsetrace.sparsing.truncation import TruncationRule
from sparsetrace.sparsing.uncertainty import SearchBootstrap, search_bootstrap

Baseline = Literal["topk", "fat"]
Definition = Literal["reference", "ours"]
_MAX_DOUBLINGS = 64  # FAT: eps doubles from 1 until the PPL target is passed
_MAX_EXTENSIONS = 4  # probes beyond the strongest one while bootstrap resamples are clipped


@dataclass(frozen=True)
class TopK:
    """Keep the k largest |a| of each token, zero the rest (``ours``: on the hidden activation)."""

    k: int

    def keep(self, h: Tensor, w_out: Tensor, gate: Tensor) -> Tensor:
        mask = torch.zeros_like(h, dtype=torch.bool)
        k = min(max(self.k, 0), h.shape[-1])
        return mask.scatter_(-1, h.abs().topk(k, dim=-1).indices, True) if k else mask


@dataclass(frozen=True)
class TopKBatch:
    """The reference Top-k: over the whole batch tensor of ``|act(gate)|``, zero the
    ``int(numel * (1 - fraction))`` smallest entries (``prune_topk``); entries that are exactly
    zero stay zero (its mask is ``|x| < 1e-18`` after the scatter)."""

    fraction: float

    def keep(self, h: Tensor, w_out: Tensor, gate: Tensor) -> Tensor:
        flat = gate.abs().reshape(-1)
        n_zero = int(flat.numel() * (1 - min(max(self.fraction, 0.0), 1.0)))
        keep = flat >= 1e-18
        if n_zero:
            keep[flat.topk(n_zero, largest=False).indices] = False
        return keep.reshape(gate.shape)


@dataclass(frozen=True)
class Fat:
    """Zero every entry whose decision value is below eps (FAT-ε): ``|act(gate)|`` for the
    reference definition, ``|a|`` of the hidden activation for ``ours``."""

    eps: float
    on_gate: bool = True

    def keep(self, h: Tensor, w_out: Tensor, gate: Tensor) -> Tensor:
        return (gate if self.on_gate else h).abs() >= self.eps


@dataclass(frozen=True)
class BaselinePoint:
    """A baseline at one parameter: Top-k's kept fraction of d_ff, or FAT's eps."""

    baseline: Baseline
    param: float
    activation_ratio: float  # mean over layers, truncated pass
    ppl_ratio: float
    layers: dict[str, float]  # per-layer activation ratio
    activation_ratio_se: float = float("nan")  # bootstrap over sequences at this parameter
    # the match redone on each resample (match_ppl(search_se=True)); its ``c`` is the strength
    uncertainty: SearchBootstrap | None = None


def baseline_rules(
    subject: Subject, baseline: Baseline, param: float, definition: Definition = "reference"
) -> dict[str, TruncationRule]:
    """Per-layer rules: ``topk`` keeps the fraction ``param`` (reference: of the batch's gate
    entries; ours: ``round(param * d_ff)`` units per token), ``fat`` uses eps = param."""
    if definition not in ("reference", "ours"):
        raise ValueError(f"unknown baseline definition {definition!r} (reference, ours)")
    reference = definition == "reference"
    if baseline == "topk":
        if reference:
            return dict.fromkeys(subject.down, TopKBatch(param))
        return {name: TopK(round(param * w)) for name, w in subject.sites.widths.items()}
    if baseline == "fat":
        return dict.fromkeys(subject.down, Fat(param, on_gate=reference))
    raise ValueError(f"unknown baseline {baseline!r} (topk, fat)")


def strength(baseline: Baseline, param: float) -> float:
    """How much a baseline drops, rising with the PPL ratio from 0 (the dense model): FAT's eps,
    Top-k's dropped fraction 1 - k (the CETT c plays this role for PPL-p% sparsity)."""
    return 1.0 - param if baseline == "topk" else param


def evaluate_baseline(
    subject: Subject, baseline: Baseline, param: float, definition: Definition = "reference"
) -> BaselinePoint:
    ev = _evaluation(subject, baseline, param, definition)
    return BaselinePoint(
        baseline=baseline, param=param, activation_ratio=ev.mean_activation_ratio,
        ppl_ratio=subject.ppl_ratio(ev), layers=dict(ev.activation_ratio),
        activation_ratio_se=ev.activation_ratio_se,
    )  # fmt: skip


def _evaluation(
    subject: Subject, baseline: Baseline, param: float, definition: Definition
) -> Evaluation:
    return subject.evaluate(baseline_rules(subject, baseline, param, definition))


def match_ppl(
    subject: Subject, baseline: Baseline, p: float = 1.0, definition: Definition = "reference",
    search_se: bool = False,
) -> BaselinePoint:  # fmt: skip
    """The baseline's parameter at which the PPL ratio is 1 + p/100 (same tolerance as
    :func:`~sparsetrace.sparsing.search.find_cett`): Top-k bisects its kept fraction in [0, 1]
    (the ratio falls as it grows), FAT bisects eps in [0, hi], hi doubled from 1 until past it.
    ``search_se``: also the match redone on each bootstrap resample (as
    :func:`~sparsetrace.sparsing.search.search_uncertainty` does for c; up to 5 passes more,
    and up to ``_MAX_EXTENSIONS`` beyond the strongest probe while resamples are clipped)."""
    target = target_ratio(p)
    probed: dict[float, Evaluation] = {}  # by strength: every parameter evaluated

    def ratio(param: float) -> float:
        ev = _evaluation(subject, baseline, param, definition)
        probed[strength(baseline, param)] = ev
        return subject.ppl_ratio(ev)

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
    point = evaluate_baseline(subject, baseline, found.x, definition)
    if not search_se:
        return point

    def bootstrap() -> SearchBootstrap:
        probes = {s: ev.sequences for s, ev in probed.items() if s > 0}
        return search_bootstrap([subject.reference.dense.sequences], [probes], target)[0]

    for s in np.quantile(bootstrap().c, REFINE_QUANTILES):
        ratio(strength(baseline, float(s)))  # strength is its own inverse
    boot = bootstrap()
    # The bisection may stop within tolerance with every probe still below the target (Top-k
    # never probes k = 0): resamples that need more are clipped to the strongest probe, which
    # would shrink the SE. Probe beyond it until none is clipped.
    for _ in range(_MAX_EXTENSIONS):
        if not boot.clipped:
            break
        top = max(probed)
        ratio(strength(baseline, (top + 1.0) / 2 if baseline == "topk" else 2.0 * top))
        boot = bootstrap()
    return replace(point, uncertainty=boot)
