"""PPL-p% sparsity: the CETT shared by all layers at which truncation costs p% perplexity.

Sparsing Law, "PPL-p% sparsity": find c with ``exp(loss_sparse - loss_dense) = 1 + p/100``, each
layer truncated at its threshold for CETT c (the largest tau with CETT_l(tau) <= c).

A :class:`Subject` is one model on a fixed evaluation set. Its dense reference takes two passes
(one to place each layer's candidate thresholds, one to evaluate CETT at all of them, see
:mod:`sparsetrace.sparsing.cett`); nothing of the activations is kept but a sample of at most
``SAMPLE_SIZE`` unit norms per layer during the first pass and ``GRID_SIZE + 1`` numbers per layer
after it. The outer search then runs the model once per candidate c (the loss must be measured),
never per candidate threshold; candidates that map to the same thresholds are evaluated once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsetrace.sites import MlpSites, down_weight, input_device, mlp_sites
from sparsetrace.sparsing.cett import GRID_SIZE, CettCurve, CettThreshold, ThresholdGrid
from sparsetrace.sparsing.truncation import Observer, Threshold, Truncation, TruncationRule
from sparsetrace.sparsing.uncertainty import (
    SearchBootstrap,
    SequenceStats,
    ratio_se,
    search_bootstrap,
)

PPL_TOL = 0.01  # stop when |PPL ratio - (1 + p/100)| <= PPL_TOL * p/100 ...
C_TOL = 1e-6  # ... or when the bracket on the searched parameter is narrower than this


@dataclass(frozen=True)
class TokenBatch:
    """Inputs and next-token targets (batch, seq); ``valid`` marks real tokens (None: all)."""

    inputs: Tensor
    targets: Tensor
    valid: Tensor | None = None

    @property
    def targets_per_sequence(self) -> Tensor:
        """(batch,) valid targets of each sequence."""
        if self.valid is None:
            return torch.full(self.targets.shape[:1], self.targets.shape[-1])
        return self.valid.sum(-1)

    @property
    def n_targets(self) -> int:
        return int(self.targets_per_sequence.sum())

    def to(self, device: torch.device) -> TokenBatch:
        valid = None if self.valid is None else self.valid.to(device)
        return TokenBatch(self.inputs.to(device), self.targets.to(device), valid)


# (batch,): each sequence's loss summed over its valid targets (per sequence, so that the
# uncertainty can resample sequences)
LossFn = Callable[[nn.Module, TokenBatch], Tensor]


def causal_lm_loss(model: nn.Module, batch: TokenBatch) -> Tensor:
    """Per sequence, the summed next-token cross-entropy of a causal language model called as
    ``model(input_ids).logits`` (ours and transformers' ``*ForCausalLM`` alike)."""
    logits = model(batch.inputs).logits.float()
    loss = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), reduction="none")
    loss = loss.view(batch.targets.shape)
    return (loss if batch.valid is None else loss * batch.valid).sum(-1)


@dataclass(frozen=True)
class Evaluation:
    """One pass over the evaluation set, dense or truncated; per-layer dicts by layer name."""

    activation_ratio: dict[str, float]
    dead_units: dict[str, int]
    sequences: SequenceStats  # per evaluated sequence: loss and activity (for uncertainties)

    @property
    def loss(self) -> float:
        """Mean loss over all evaluated targets."""
        return float(self.sequences.loss.sum() / self.sequences.targets.sum())

    @property
    def activation_ratio_se(self) -> float:
        """SE of the mean over layers at these thresholds (bootstrap over sequences)."""
        return ratio_se(self.sequences)

    @property
    def mean_activation_ratio(self) -> float:
        """Averaged over layers (Sparsing Law, "PPL-p% sparsity")."""
        return sum(self.activation_ratio.values()) / len(self.activation_ratio)


@dataclass(frozen=True)
class Reference:
    """The dense model on the evaluation set: its pass, and each layer's CETT curve."""

    dense: Evaluation
    curves: dict[str, CettCurve]


@dataclass(frozen=True)
class LayerMeasurement:
    """One layer at a shared CETT: threshold and achieved CETT (dense activations), activation
    ratio in the truncated pass and on the dense activations, the grid's ratio tolerance, and
    dead units in the truncated pass."""

    tau: float
    cett: float
    activation_ratio: float
    activation_ratio_dense: float
    ratio_gap: float
    dead_units: int


@dataclass(frozen=True)
class Measurement:
    """A model truncated at one shared CETT c."""

    cett: float
    ppl_ratio: float
    loss_dense: float
    loss_sparse: float
    activation_ratio: float  # mean over layers, truncated pass
    layers: dict[str, LayerMeasurement]
    activation_ratio_se: float = float("nan")  # bootstrap over the evaluated sequences


class Subject:
    """One model on a fixed evaluation set; counts its passes over that set in ``passes``.

    ``sites``: the model's down projections and gate taps (default: :func:`mlp_sites`; a gated
    layer without a gate tap is decided on its product ``act(gate) * up`` by every rule);
    ``loss_fn`` gives each sequence's summed loss (default: a causal LM's).
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Sequence[TokenBatch],
        sites: MlpSites | None = None,
        loss_fn: LossFn = causal_lm_loss,
        grid_size: int = GRID_SIZE,
    ) -> None:
        if not batches:
            raise ValueError("empty evaluation set")
        self.model, self.batches = model.eval(), list(batches)
        self.sites = sites if sites is not None else mlp_sites(model)
        self.down = self.sites.down
        self.loss_fn, self.grid_size = loss_fn, grid_size
        self.passes = 0
        self._memo: dict[tuple, Evaluation] = {}
        self.probed: dict[float, Evaluation] = {}  # every c evaluated (at_cett)

    @torch.no_grad()
    def run(
        self, rules: Mapping[str, TruncationRule] | None = None, observe: Observer | None = None
    ) -> Evaluation:
        """One pass over the evaluation set with ``rules`` applied (none: dense)."""
        device = input_device(self.model)  # where a device_map put the embedding
        losses, targets = [], []
        with Truncation(self.sites, rules, observe) as trunc:
            for batch in self.batches:
                batch = batch.to(device)
                trunc.shape, trunc.valid = tuple(batch.inputs.shape), batch.valid
                loss = self.loss_fn(self.model, batch)
                if loss.shape != batch.targets.shape[:1]:
                    raise ValueError(f"loss_fn must return one summed loss per sequence, shape "
                                     f"{tuple(batch.targets.shape[:1])}; got "
                                     f"{tuple(loss.shape)}")  # fmt: skip
                losses.append(loss.double().cpu())
                targets.append(batch.targets_per_sequence.double().cpu())
        self.passes += 1
        loss_sums = torch.cat(losses).numpy()
        active, tokens, widths = trunc.sequence_counts()
        if active.shape[1] != len(loss_sums):
            raise ValueError(f"{active.shape[1]} sequences seen by the down projections, "
                             f"{len(loss_sums)} losses: every layer must run once per batch on "
                             "(batch, seq, d_ff) inputs")  # fmt: skip
        sequences = SequenceStats(loss_sums, torch.cat(targets).numpy(), active, tokens, widths)
        return Evaluation(trunc.activation_ratio(), trunc.dead_units(), sequences)

    @cached_property
    def reference(self) -> Reference:
        """Dense pass (loss, candidate thresholds), then a second pass for the CETT curves."""
        grids = {name: ThresholdGrid(down_weight(m)) for name, m in self.down.items()}
        dense = self.run(observe=lambda name, rows, _: grids[name].update(rows))
        curves = {
            name: CettCurve(down_weight(self.down[name]), g.grid(self.grid_size))
            for name, g in grids.items()
        }
        self.run(observe=lambda name, rows, _: curves[name].update(rows))
        for curve in curves.values():
            curve.freeze()
        return Reference(dense, curves)

    def evaluate(self, rules: Mapping[str, TruncationRule]) -> Evaluation:
        """A truncated pass, memoised by the rules (frozen dataclasses)."""
        key = tuple(sorted(rules.items(), key=lambda item: item[0]))
        if key not in self._memo:
            self._memo[key] = self.run(rules)
        return self._memo[key]

    def ppl_ratio(self, evaluation: Evaluation) -> float:
        return math.exp(evaluation.loss - self.reference.dense.loss)

    def thresholds(self, c: float) -> dict[str, CettThreshold]:
        """Each layer's threshold for the shared CETT c."""
        return {name: curve.threshold(c) for name, curve in self.reference.curves.items()}

    def at_cett(self, c: float) -> Evaluation:
        ev = self.evaluate({name: Threshold(t.tau) for name, t in self.thresholds(c).items()})
        self.probed[c] = ev
        return ev

    def measure(self, c: float) -> Measurement:
        """The model truncated at shared CETT c: PPL ratio and per-layer results."""
        chosen, ev = self.thresholds(c), self.at_cett(c)
        layers = {
            name: LayerMeasurement(
                tau=t.tau, cett=t.cett, activation_ratio=ev.activation_ratio[name],
                activation_ratio_dense=t.activation_ratio, ratio_gap=t.ratio_gap,
                dead_units=ev.dead_units[name],
            )
            for name, t in chosen.items()
        }  # fmt: skip
        return Measurement(
            cett=c, ppl_ratio=self.ppl_ratio(ev), loss_dense=self.reference.dense.loss,
            loss_sparse=ev.loss, activation_ratio=ev.mean_activation_ratio, layers=layers,
            activation_ratio_se=ev.activation_ratio_se,
        )  # fmt: skip


@dataclass(frozen=True)
class Bisection:
    """Result of :func:`bisect`: the evaluated x whose value is closest to the target."""

    x: float
    value: float
    target: float
    lo: float
    hi: float
    points: list[tuple[float, float]] = field(default_factory=list)


def bisect(
    f: Callable[[float], float],
    lo: float,
    hi: float,
    target: float,
    tol: float,
    x_tol: float = C_TOL,
    increasing: bool = True,
) -> Bisection:
    """Solve f(x) = target for f monotone on [lo, hi], evaluating midpoints only.

    Stops when ``|f(x) - target| <= tol`` or the bracket is narrower than ``x_tol``.
    """
    if not hi - lo > x_tol:
        raise ValueError(f"empty bracket [{lo}, {hi}]")
    points: list[tuple[float, float]] = []
    while hi - lo > x_tol:
        x = (lo + hi) / 2
        y = f(x)
        points.append((x, y))
        if abs(y - target) <= tol:
            break
        if (y < target) == increasing:
            lo = x
        else:
            hi = x
    x, y = min(points, key=lambda p: abs(p[1] - target))
    return Bisection(x=x, value=y, target=target, lo=lo, hi=hi, points=points)


def target_ratio(p: float) -> float:
    if not p > 0:
        raise ValueError(f"p must be > 0 (percent of perplexity); got {p}")
    return 1.0 + p / 100.0


def find_cett(subjects: Sequence[Subject], p: float, c_tol: float = C_TOL) -> Bisection:
    """Binary search of the shared CETT c in [0, 1] so that the PPL ratio, averaged over
    ``subjects`` (one model, or a run's final checkpoints), equals 1 + p/100.

    Tolerance: ``|ratio - (1 + p/100)| <= PPL_TOL * p/100`` or a bracket on c below ``c_tol``;
    with finitely many candidate thresholds the ratio is a step function of c, and the result is
    the evaluated c whose ratio is closest to the target.
    """
    target = target_ratio(p)

    def mean_ratio(c: float) -> float:
        return sum(s.ppl_ratio(s.at_cett(c)) for s in subjects) / len(subjects)

    return bisect(mean_ratio, 0.0, 1.0, target, PPL_TOL * (target - 1.0), c_tol)


# Where the search's uncertainty evaluates c again after a first bootstrap: quantiles of the
# resamples' own c, so that their crossings fall between close evaluated points.
REFINE_QUANTILES = (0.025, 0.16, 0.5, 0.84, 0.975)


def search_uncertainty(subjects: Sequence[Subject], p: float) -> list[SearchBootstrap]:
    """Per subject, its activation ratio at PPL-p% with the search for c redone on each bootstrap
    resample of the evaluated sequences (:mod:`sparsetrace.sparsing.uncertainty`): first along the
    c that :func:`find_cett` evaluated, then again after evaluating the first bootstrap's c
    quantiles (``REFINE_QUANTILES``; at most 5 passes per subject, fewer when thresholds repeat).
    The subjects are those the search averaged over, on the same sequences."""

    def bootstrap() -> list[SearchBootstrap]:
        dense = [s.reference.dense.sequences for s in subjects]
        probes = [{c: ev.sequences for c, ev in s.probed.items()} for s in subjects]
        return search_bootstrap(dense, probes, target_ratio(p))

    for c in np.quantile(bootstrap()[0].c, REFINE_QUANTILES):
        for s in subjects:
            s.at_cett(float(c))
    return bootstrap()


@dataclass(frozen=True)
class PplSparsity:
    """PPL-p% sparsity of one model: the search and the model at the c found; ``uncertainty``
    the resamples of the whole measurement (its ``se`` includes the search for c), None when not
    asked for."""

    p: float
    search: Bisection
    measurement: Measurement
    passes: int
    uncertainty: SearchBootstrap | None = None


def ppl_sparsity(subject: Subject, p: float = 1.0, search_se: bool = False) -> PplSparsity:
    """PPL-p% sparsity of one model (Sparsing Law, "PPL-p% sparsity"; the paper's p = 1);
    ``search_se``: also the uncertainty with the search included (up to 5 passes more)."""
    search = find_cett([subject], p)
    measurement = subject.measure(search.x)
    uncertainty = search_uncertainty([subject], p)[0] if search_se else None
    return PplSparsity(p=p, search=search, measurement=measurement, passes=subject.passes,
                       uncertainty=uncertainty)  # fmt: skip
