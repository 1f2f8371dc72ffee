"""Activation ratio vs training tokens: the Sparsing Law's power laws, fitted with physical bounds.

Sparsing Law (Luo et al.), "Laws" (D = training tokens in billions):
- ReLU, a decreasing "logspace power law": ``A(D) = exp(-c * D**alpha + b) + A0``;
- SiLU, increasing and converging: ``A(D) = -c * D**(-alpha) + A0``;
- the baselines the authors compare them with by MAE and MSE (their SparsingLawData scripts
  ``calc_log.py`` / ``calc_sigmoid.py``): logarithmic ``A0 + c * log(a*D + b)`` and
  sigmoid-like ``a - 1 / (1 + b * exp(c*D + d))``.

**The limit A0 is the answer** to "what activation ratio does this model converge to", so it must
be physical: the fit is bounded (ReLU: 0 <= A0 <= the lowest observed ratio, a falling curve
converges below its points; SiLU: the highest observed ratio <= A0 <= 1, a rising one converges
above its points and a ratio is a share of units; alpha > 0, c >= 0). The authors fit
unbounded (Levenberg-Marquardt), which on their own 0.4B ReLU curve returns A0 < 0.
``skip_first`` drops early checkpoints. The rule for choosing it (the authors' stated one, their
Appendix E): drop the checkpoints taken during warm-up, and no more.
Their published parameters for some models need further drops chosen by hand (1.2B ReLU: the
first 6; results/sparsing-law-published-curves.md lists what reproduces each); when a fit's limit
sits on its bound beyond the data (ReLU 0, SiLU 1), the curve does not determine the limit, and
the fit says so rather than dropping points until it moves (on the bound at the data, the curve
has flattened: :attr:`LawFit.limit_flat`).

Fitting: for fixed alpha (and A0 for ReLU) each form is linear in its remaining parameters, so a
grid over the nonlinear ones with a linear least-squares solve at each point gives robust starts;
the best few are refined with scipy ``curve_fit`` (trust-region reflective, bounded) and the
lowest MSE wins. Uncertainty: standard errors from the fit's covariance (A0's 95 % interval is
A0 ± 1.96 SE, cut at the physical bound; a fit that sits on the bound says so), or on request a
residual bootstrap (deterministic seed; ~0.1-0.5 s per resample here). Deterministic throughout.

Two more laws serve the width-depth experiment (Sparsing Law: at a fixed parameter count the
limit activation ratio rises linearly with the width-depth ratio up to a bottleneck, then stops):
the training loss over tokens, ``L(D) = L_inf + B * D**(-beta)`` (:func:`fit_loss_law`, the limit
loss L_inf bounded like A0: 0 <= L_inf <= the lowest observed loss), and the two-segment line of
the limit A0 across arms (:func:`fit_bottleneck`).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from scipy.optimize import OptimizeWarning, curve_fit

from sparsetrace.errors import UserError

FORMS = ("relu", "silu")
BASELINES = ("log", "sigmoid")
MIN_POINTS = 5  # more points than the 4 parameters of the ReLU law
TOKENS_PER_UNIT = 1e9  # D is in billions of tokens
BOOTSTRAP_EVALS = 400  # a bootstrap refit starts at the fit itself: few evaluations suffice
_ALPHAS = np.geomspace(0.02, 4.0, 40)
_REFINED = 6  # best grid starts refined by curve_fit
_Z95 = 1.96  # two-sided 95 % normal quantile

Array = np.ndarray


def relu_law(d: Array, alpha: float, b: float, c: float, a0: float) -> Array:
    """Sparsing Law, ReLU: A(D) = exp(-c * D**alpha + b) + A0."""
    return np.exp(-c * d**alpha + b) + a0


def silu_law(d: Array, alpha: float, c: float, a0: float) -> Array:
    """Sparsing Law, SiLU: A(D) = -c * D**(-alpha) + A0."""
    return -c * d ** (-alpha) + a0


def log_law(d: Array, a: float, b: float, c: float, a0: float) -> Array:
    """Logarithmic baseline: A(D) = A0 + c * log(a*D + b)."""
    return a0 + c * np.log(a * d + b)


def sigmoid_law(d: Array, a: float, b: float, c: float, e: float) -> Array:
    """Sigmoid-like baseline (the authors' ``inv_exp_func``): a - 1 / (1 + b * exp(c*D + e))."""
    return a - 1.0 / (1.0 + b * np.exp(c * d + e))


@dataclass(frozen=True)
class LawFit:
    """A fitted form: parameters by name (None: not part of the form), their standard errors,
    MAE / MSE on the fitted points and MSE on all points, the points skipped from the start,
    A0's bootstrap interval, and the baselines fitted to the same points."""

    form: str
    params: dict[str, float | None]
    mae: float
    mse: float
    skip: int = 0
    mse_all: float = float("nan")
    se: dict[str, float] = field(default_factory=dict)
    a0_interval: tuple[float, float] | None = None
    baselines: dict[str, LawFit] = field(default_factory=dict)
    a0_bounds: tuple[float, float] | None = None  # the physical range A0 was fitted in

    @property
    def limit_on_bound(self) -> bool:
        """A0 sits on either physical bound (within 0.1 % of the bounding ratio): beyond the data
        the curve does not determine the limit (:attr:`limit_undetermined`); at the data it has
        flattened (:attr:`limit_flat`)."""
        if self.a0_bounds is None or self.limit is None:
            return False
        return _on_bound(self.limit, self.a0_bounds)

    @property
    def limit_flat(self) -> bool:
        """A0 on the bound at the data — the lowest observed ratio for the ReLU form, the highest
        for SiLU: the points have flattened (least squares would put the limit past them), so
        the limit is that extreme value, biased towards it by the points' noise, with a one-sided
        interval. A ReLU curve that reaches 0 is flat at 0."""
        if not self.limit_on_bound or self.form not in FORMS:
            return False
        lower, upper = self.a0_bounds
        at_data = upper if self.form == "relu" else lower
        return abs(self.limit - at_data) <= 1e-3 * max(abs(lower), abs(upper))

    @property
    def limit_undetermined(self) -> str:
        """Why the points do not determine A0 ('' when they do): A0 on its physical bound beyond
        the data (ReLU: 0 above the data; SiLU: 1; a limit on the bound at the data is
        :attr:`limit_flat`, determined), no finite interval, or its 95 % interval reaching both
        ends of the physical range (within 0.1 %)."""
        if self.limit_on_bound and not self.limit_flat:
            return "limit A0 on its physical bound beyond the data"
        if self.form in FORMS and not np.isfinite(self.a0_low_high).all():
            return "no interval for A0 (the fit's covariance is not finite)"
        if self.a0_interval and self.a0_bounds and all(np.isfinite(self.a0_bounds)):
            (lo, hi), (lower, upper) = self.a0_interval, self.a0_bounds
            if lower == upper:  # pinned (a ReLU curve that reached 0): nothing left to span
                return ""
            tol = 1e-3 * max(abs(lower), abs(upper))
            if lo <= lower + tol and hi >= upper - tol:
                return "the 95 % interval of A0 spans its whole physical range"
        return ""

    @property
    def a0_low_high(self) -> tuple[float, float]:
        """A0's 95 % interval; (nan, nan) where none was computed."""
        return self.a0_interval or (float("nan"), float("nan"))

    @property
    def limit(self) -> float | None:
        """The activation ratio the law converges to (A0); None for the baselines."""
        return self.params.get("A0") if self.form in FORMS else None

    @property
    def baseline(self) -> LawFit | None:
        """The logarithmic baseline (the one the Sparsing Law paper tabulates)."""
        return self.baselines.get("log")

    def curve(self, d: Array) -> Array:
        """The fitted A at D (billions of tokens)."""
        p = self.params
        if self.form == "relu":
            return relu_law(d, p["alpha"], p["b"], p["c"], p["A0"])
        if self.form == "silu":
            return silu_law(d, p["alpha"], p["c"], p["A0"])
        if self.form == "sigmoid":
            return sigmoid_law(d, p["a"], p["b"], p["c"], p["d"])
        return log_law(d, p["a"], p["b"], p["c"], p["A0"])

    def to_dict(self) -> dict:
        out = {"form": self.form, "params": self.params, "mae": self.mae, "mse": self.mse}
        if self.form in FORMS:
            interval = list(self.a0_interval) if self.a0_interval else None
            baselines = {k: v.to_dict() for k, v in self.baselines.items()}
            out.update({"skip_first": self.skip, "mse_all_points": self.mse_all, "se": self.se,
                        "A0_interval": interval, "A0_on_bound": self.limit_on_bound,
                        "A0_flat": self.limit_flat, "A0_undetermined": self.limit_undetermined,
                        "baselines": baselines})  # fmt: skip
        return out


def _on_bound(value: float, bounds: tuple[float, float]) -> bool:
    """``value`` within 0.1 % (of the larger finite bound) of either finite bound."""
    finite = [b for b in bounds if np.isfinite(b)]
    scale = max(abs(b) for b in finite)
    return any(abs(value - b) <= 1e-3 * scale for b in finite)


@dataclass(frozen=True)
class _Form:
    """A law as fitted: f(D, *free), the free parameters' bounds given the data, grid starts,
    and how the free parameters map to the reported ones."""

    f: Callable[..., Array]
    names: tuple[str, ...]
    bounds: Callable[[Array, Array], tuple[list[float], list[float]]]
    starts: Callable[[Array, Array], list[tuple[float, ...]]]
    report: Callable[..., dict[str, float | None]]


def _lstsq(columns: list[Array], y: Array) -> Array:
    return np.linalg.lstsq(np.stack(columns, axis=1), y, rcond=None)[0]


def _relu_starts(d: Array, y: Array) -> list[tuple[float, ...]]:
    """For each alpha and a floor A0 in [0, min(y)): log(y - A0) = b - c * D**alpha is linear."""
    floors = float(y.min()) * np.array([0.0, 0.3, 0.6, 0.8, 0.9, 0.95, 0.99, 0.999])
    starts = []
    for alpha in _ALPHAS:
        for a0 in floors:
            # Points on the floor (a curve that reaches 0 pins A0 there) have no logarithm: the
            # start comes from the others, the refinement fits them all.
            above = y > a0
            b, c = _lstsq([np.ones_like(d[above]), -(d[above] ** alpha)], np.log(y[above] - a0))
            starts.append((alpha, b, max(c, 0.0), a0))
    return starts


def _silu_starts(d: Array, y: Array) -> list[tuple[float, ...]]:
    """For each alpha: y = A0 - c * D**(-alpha) is linear in (c, A0); A0 held at max(y) when
    the free solution falls below it."""
    starts = []
    for alpha in _ALPHAS:
        a0, c = _lstsq([np.ones_like(d), -(d ** (-alpha))], y)
        if a0 < y.max():
            a0 = float(y.max())
            (c,) = _lstsq([d ** (-alpha)], a0 - y)
        starts.append((alpha, max(c, 0.0), a0))
    return starts


def _log_lowest_b(d: Array) -> float:
    """a = 1: D + b must stay positive at the smallest D."""
    return -float(d.min()) * (1 - 1e-9)


def _log_starts(d: Array, y: Array) -> list[tuple[float, ...]]:
    """For each offset b (a = 1): y = A0 + c * log(D + b) is linear in (c, A0)."""
    near_lowest = _log_lowest_b(d) * (1 - np.geomspace(1e-4, 1.0, 12))
    starts = []
    for b in [*near_lowest, *(np.geomspace(1e-4, 1e4, 40) * float(np.median(d)))]:
        a0, c = _lstsq([np.ones_like(d), np.log(d + b)], y)
        starts.append((b, c, a0))
    return starts


def _sigmoid_starts(d: Array, y: Array) -> list[tuple[float, ...]]:
    """The authors' hand-set starts (ReLU and SiLU curves) and a grid over the rate c with the
    level a at the curve's far end."""
    starts = [(1.07, 0.41, -0.17, -2.517), (1.07, 0.35, -0.046, -2.587),
              (1.07, 0.39, -0.025, -2.757), (0.38, 6.41, 0.06, 0.752)]  # fmt: skip
    span = float(np.ptp(d)) or 1.0
    for rate in np.geomspace(0.1, 30, 8) / span:
        for sign in (-1.0, 1.0):
            starts.append((float(y[-1]) + 1.0, 1.0, sign * rate, 0.0))
    return starts


_INF = np.inf
_FORMS = {
    "relu": _Form(
        relu_law, ("alpha", "b", "c", "A0"),
        lambda d, y: ([1e-6, -_INF, 0.0, 0.0], [_INF, _INF, _INF, float(y.min())]),
        _relu_starts, lambda alpha, b, c, a0: {"alpha": alpha, "b": b, "c": c, "A0": a0},
    ),
    "silu": _Form(
        silu_law, ("alpha", "c", "A0"),
        # A0 <= 1: a share of units (the tiny margin keeps the bounds apart when max(y) = 1)
        lambda d, y: ([1e-6, 0.0, float(y.max())], [_INF, _INF, max(1.0, float(y.max()) + 1e-9)]),
        _silu_starts, lambda alpha, c, a0: {"alpha": alpha, "b": None, "c": c, "A0": a0},
    ),
    "log": _Form(
        lambda d, b, c, a0: log_law(d, 1.0, b, c, a0), ("b", "c", "A0"),
        lambda d, y: ([_log_lowest_b(d), -_INF, -_INF], [_INF] * 3), _log_starts,
        lambda b, c, a0: {"a": 1.0, "b": b, "c": c, "A0": a0},
    ),
    "sigmoid": _Form(
        sigmoid_law, ("a", "b", "c", "d"),
        lambda d, y: ([-_INF, 1e-12, -_INF, -_INF], [_INF] * 4), _sigmoid_starts,
        lambda a, b, c, e: {"a": a, "b": b, "c": c, "d": e},
    ),
}  # fmt: skip


def _mse(form: _Form, d: Array, y: Array, params: tuple[float, ...]) -> float:
    with np.errstate(all="ignore"):
        err = float(np.mean((form.f(d, *params) - y) ** 2))
    return err if np.isfinite(err) else np.inf


def _refine(
    form: _Form, d: Array, y: Array, p0: tuple[float, ...], lower: Array, upper: Array,
    max_evals: int = 3000,
) -> tuple[tuple[float, ...], Array | None]:  # fmt: skip
    """One bounded curve_fit from p0: (parameters, covariance) or (p0 clipped to the bounds,
    None) without convergence. A parameter whose bounds coincide (A0 of a ReLU curve that
    reaches 0) is held there with zero variance: curve_fit refuses equal bounds. An upper bound
    below the lower one (a bootstrap resample of a ReLU curve dipping below 0) is raised to it."""
    upper = np.maximum(upper, lower)
    start = np.clip(np.asarray(p0, dtype=np.float64), lower, upper)
    free = lower < upper

    def f(x: Array, *theta: float) -> Array:
        full = start.copy()
        full[free] = theta
        return form.f(x, *full)

    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", OptimizeWarning)
            popt, pcov_free = curve_fit(
                f, d, y, p0=start[free], bounds=(lower[free], upper[free]), method="trf",
                maxfev=max_evals,
            )  # fmt: skip
    except (RuntimeError, ValueError):  # no convergence from this start: the others remain
        return tuple(float(v) for v in start), None
    params = start.copy()
    params[free] = popt
    pcov = np.zeros((len(start), len(start)))
    pcov[np.ix_(free, free)] = pcov_free
    return tuple(float(v) for v in params), pcov


def _covariance_at(
    form: _Form, d: Array, y: Array, params: tuple[float, ...], lower: Array, upper: Array
) -> Array:
    """The covariance curve_fit would report at ``params`` (s^2 (J'J)^-1, J by central
    differences, s^2 = SSR / (n - free parameters)), for a best fit that is a grid start no
    refinement improved on; parameters pinned by equal bounds get zero variance."""
    p = np.asarray(params, dtype=np.float64)
    free = np.flatnonzero(lower < upper)
    jac = np.empty((len(d), len(free)))
    with np.errstate(all="ignore"):
        for col, i in enumerate(free):
            h = 1e-6 * max(abs(p[i]), 1e-6)
            up, down = p.copy(), p.copy()
            up[i], down[i] = p[i] + h, p[i] - h
            jac[:, col] = (form.f(d, *up) - form.f(d, *down)) / (2 * h)
        ssr = float(np.sum((form.f(d, *p) - y) ** 2))
    cov = np.full((len(p), len(p)), np.inf)
    if np.isfinite(jac).all() and len(d) > len(free):
        cov[:] = 0.0
        cov[np.ix_(free, free)] = np.linalg.pinv(jac.T @ jac) * ssr / (len(d) - len(free))
    return cov


def _best(form: _Form, d: Array, y: Array) -> tuple[tuple[float, ...], Array | None]:
    lower, upper = (np.array(v, dtype=np.float64) for v in form.bounds(d, y))
    starts = sorted(form.starts(d, y), key=lambda p: _mse(form, d, y, p))[:_REFINED]
    candidates = [(tuple(np.clip(p, lower, upper)), None) for p in starts]
    candidates += [_refine(form, d, y, p0, lower, upper) for p0 in starts]
    params, pcov = min(candidates, key=lambda c: _mse(form, d, y, c[0]))
    if pcov is None:
        pcov = _covariance_at(form, d, y, params, lower, upper)
    return params, pcov


def _fit_form(name: str, d: Array, y: Array) -> LawFit:
    form = _FORMS[name]
    best, pcov = _best(form, d, y)
    with np.errstate(all="ignore"):
        resid = form.f(d, *best) - y
    params = {k: None if v is None else float(v) for k, v in form.report(*best).items()}
    se = {}
    if pcov is not None and np.isfinite(pcov).all():
        se = {k: float(np.sqrt(max(v, 0.0))) for k, v in zip(form.names, np.diag(pcov),
                                                            strict=True)}  # fmt: skip
    return LawFit(name, params, float(np.mean(np.abs(resid))), float(np.mean(resid**2)), se=se)


def _covariance_interval(name: str, d: Array, y: Array, fit: LawFit) -> tuple[float, float]:
    """A0 ± 1.96 standard errors (the fit's covariance), cut at A0's bounds."""
    lower, upper = _FORMS[name].bounds(d, y)
    i = _FORMS[name].names.index("A0")
    a0, se = float(fit.params["A0"]), fit.se.get("A0", float("nan"))
    return max(a0 - _Z95 * se, lower[i]), min(a0 + _Z95 * se, upper[i])


def _bootstrap_interval(
    name: str, d: Array, y: Array, fit: LawFit, resamples: int
) -> tuple[float, float]:
    """95 % interval of A0 from a residual bootstrap around the fit (fixed seed)."""
    form = _FORMS[name]
    center = tuple(float(fit.params[k]) for k in form.names)
    base = form.f(d, *center)
    resid = y - base
    gen = np.random.default_rng(0)
    a0s = []
    for _ in range(resamples):
        yb = base + gen.choice(resid, size=len(resid), replace=True)
        # The bounds follow the resampled points, as in a fit to them.
        lo, hi = (np.array(v, dtype=np.float64) for v in form.bounds(d, yb))
        popt, _ = _refine(form, d, yb, center, lo, hi, BOOTSTRAP_EVALS)
        a0s.append(popt[form.names.index("A0")])
    return float(np.percentile(a0s, 2.5)), float(np.percentile(a0s, 97.5))


def _check_points(d: Array, y: Array, what: str) -> None:
    """1-D of one length, enough points, finite, tokens positive and increasing."""
    if d.shape != y.shape or d.ndim != 1:
        raise ValueError(f"tokens and {what} must be 1-D of one length; got {d.shape}, {y.shape}")
    if len(d) < MIN_POINTS:
        raise ValueError(f"need at least {MIN_POINTS} points to fit, got {len(d)}")
    if not (np.isfinite(d).all() and np.isfinite(y).all()) or (d <= 0).any():
        raise ValueError(f"tokens must be positive numbers and {what} finite")
    if (np.diff(d) <= 0).any():
        raise ValueError("tokens must increase from one point to the next")


def _check(d: Array, y: Array) -> None:
    _check_points(d, y, "ratios")
    if (y < 0).any() or (y > 1).any():
        raise ValueError("activation ratios must lie in [0, 1]")
    if np.ptp(y) == 0:
        raise ValueError(f"the activation ratio is {y[0]:g} at every point: a constant curve "
                         "determines no law")  # fmt: skip


def fit_law(
    tokens: Array, ratio: Array, form: str = "relu", skip_first: int = 0, bootstrap: int = 0
) -> LawFit:
    """Fit the Sparsing Law's ``form`` ('relu' or 'silu') and the baselines to activation ratios
    over training tokens (counts, not billions), leaving out the first ``skip_first`` points.
    The limit A0 is :attr:`LawFit.limit`; its interval comes from the covariance, or from
    ``bootstrap`` residual resamples when > 0."""
    if form not in FORMS:
        raise ValueError(f"unknown law form {form!r} ({', '.join(FORMS)})")
    d_all = np.asarray(tokens, dtype=np.float64) / TOKENS_PER_UNIT
    y_all = np.asarray(ratio, dtype=np.float64)
    _check(d_all, y_all)
    skip = int(skip_first)
    if not 0 <= skip <= len(d_all) - MIN_POINTS:
        raise ValueError(
            f"skip_first {skip} leaves {len(d_all) - skip} points; fitting needs {MIN_POINTS}"
        )
    d, y = d_all[skip:], y_all[skip:]
    _check(d, y)
    fit = _fit_form(form, d, y)
    with np.errstate(all="ignore"):
        mse_all = float(np.mean((fit.curve(d_all) - y_all) ** 2))
    interval = (
        _bootstrap_interval(form, d, y, fit, bootstrap)
        if bootstrap > 0
        else _covariance_interval(form, d, y, fit)
    )
    baselines = {name: _fit_form(name, d, y) for name in BASELINES}
    lower, upper = _FORMS[form].bounds(d, y)
    i = _FORMS[form].names.index("A0")
    if lower[i] == upper[i]:  # A0 pinned (a ReLU curve that reaches 0): no spread to estimate
        interval = (float(lower[i]), float(upper[i]))
    return LawFit(form, fit.params, fit.mae, fit.mse, skip, mse_all, fit.se, interval, baselines,
                  (float(lower[i]), float(upper[i])))  # fmt: skip


def warmup_points(steps: Array, warmup_steps: int) -> int:
    """The authors' rule for ``skip_first`` (their Appendix E): the number of checkpoints taken
    during warm-up, i.e. at or before step ``warmup_steps`` (every update they saw was a warm-up
    update). ``steps`` ascending, one per point."""
    return int((np.asarray(steps) <= warmup_steps).sum())


def _run_config(run: Path) -> dict:
    """A run directory's ``config.yaml`` as a dict; OSError or yaml.YAMLError when unreadable."""
    config = yaml.safe_load((Path(run) / "config.yaml").read_text())
    return config if isinstance(config, dict) else {}


def run_activation(run: Path) -> str | None:
    """A run directory's MLP activation: ``model.activation`` of its ``config.yaml``, else of its
    ``meta.json`` (an ``analyze`` or Hugging Face ``sparsing-law`` directory); None when neither
    names one."""
    for name, parse in (("config.yaml", yaml.safe_load), ("meta.json", json.loads)):
        try:
            activation = parse((Path(run) / name).read_text())["model"]["activation"]
        except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
            continue
        if isinstance(activation, str):
            return activation
    return None


def run_law_form(run: Path) -> str | None:
    """:func:`law_form` of a run directory's activation (:func:`run_activation`); None when it
    names none; UserError for an activation without a Sparsing Law form."""
    activation = run_activation(run)
    return None if activation is None else law_form(activation)


def run_warmup_points(run: Path) -> int | None:
    """:func:`warmup_points` of a run directory's ``sparsing_law.csv`` (rows ``layer == all``)
    under the warm-up of its ``config.yaml``; None when either is missing or unreadable."""
    try:
        frame = pd.read_csv(Path(run) / "sparsing_law.csv", dtype={"layer": str})
        warmup = int(_run_config(run)["train"]["warmup_steps"])
        steps = frame.loc[frame["layer"] == "all", "step"].sort_values().to_numpy()
        steps = steps[steps > 0]  # as read_law_data: step 0 is not on the law's axis
    except (OSError, ValueError, KeyError, TypeError, pd.errors.ParserError, yaml.YAMLError):
        return None
    return warmup_points(steps, warmup)


def read_law_data(path: Path) -> tuple[Array, Array]:
    """(tokens, activation ratio) from a CSV (columns tokens, activation_ratio), a run directory
    (its sparsing_law.csv, layer 'all'; steps where its tokens are unknown; step 0 left out) or
    the authors' JSON
    ({"token_passed", "activation_ratio"}, recognised by its content: their files are named
    .txt). Bad input: UserError."""
    path = Path(path)
    if path.is_dir():
        csv = path / "sparsing_law.csv"
        if not csv.is_file():
            raise UserError(f"{path}: no sparsing_law.csv (run `sparsetrace sparsing-law {path}`)")
        frame = _read_csv(csv)
        if "layer" in frame.columns:
            frame = frame[frame["layer"].astype(str) == "all"]
        if "step" in frame.columns and "tokens" in frame.columns and frame["tokens"].isna().all():
            # Tokens per step unknown (a Hugging Face series): D in steps. The laws' A0 and
            # alpha do not depend on D's unit (it scales c alone).
            frame = frame.assign(tokens=frame["step"])
        if "tokens" in frame.columns:  # the untrained model (step 0) has no D on the law's axis
            frame = frame[pd.to_numeric(frame["tokens"], errors="coerce").fillna(1) > 0]
    elif not path.is_file():
        raise UserError(f"{path}: no such file or directory")
    elif _starts_with_brace(path):
        frame = _read_authors_json(path)
    else:
        frame = _read_csv(path)
    missing = {"tokens", "activation_ratio"} - set(frame.columns)
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
    try:
        tokens = frame["tokens"].to_numpy(dtype=np.float64)
        ratio = frame["activation_ratio"].to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        raise UserError(f"{path}: tokens and activation_ratio must be numbers") from None
    if len(tokens) < MIN_POINTS:
        raise UserError(f"{path}: {len(tokens)} points; fitting needs at least {MIN_POINTS}")
    try:
        _check(tokens, ratio)
    except ValueError as err:
        raise UserError(f"{path}: {err}") from None
    return tokens, ratio


def _starts_with_brace(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(64).lstrip().startswith(b"{")


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: unreadable CSV ({err})") from None


def _read_authors_json(path: Path) -> pd.DataFrame:
    try:
        data = json.loads(path.read_text())
        tokens, ratio = data["token_passed"], data["activation_ratio"]
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: unreadable JSON ({err})") from None
    except (KeyError, TypeError):
        layout = '{"token_passed": [...], "activation_ratio": [...]}'
        raise UserError(f"{path}: expected {layout}") from None
    if not isinstance(tokens, list) or not isinstance(ratio, list) or len(tokens) != len(ratio):
        raise UserError(f"{path}: token_passed and activation_ratio must be lists of one length")
    return pd.DataFrame({"tokens": tokens, "activation_ratio": ratio})


RELU_LIKE = ("relu", "relu2", "reglu")  # fitted with the ReLU law (activation ratio falls)
# fitted with the SiLU law (ratio rises); transformers' names of GELU and SiLU variants included
SILU_LIKE = ("silu", "gelu", "swiglu", "geglu", "swish", "gelu_new", "gelu_pytorch_tanh",
             "gelu_fast", "gelu_python", "quick_gelu")  # fmt: skip


def law_form(activation: str) -> str:
    """The Sparsing Law form of an activation's curve: 'relu' or 'silu'."""
    if activation in RELU_LIKE:
        return "relu"
    if activation in SILU_LIKE:
        return "silu"
    raise UserError(
        f"no Sparsing Law form for activation {activation!r} (relu-like: "
        f"{', '.join(RELU_LIKE)}; silu-like: {', '.join(SILU_LIKE)}; fit-law takes "
        "--form relu or silu)"
    )


# --------------------------------------------------------------------------------------------------
# Training loss over tokens: the limit loss

LOSS_BETA_MAX = 4.0  # language-model loss decays as D**-beta with beta well below 1: 4 is loose


def loss_law(d: Array, l_inf: float, b: float, beta: float) -> Array:
    """Training loss over tokens: L(D) = L_inf + B * D**(-beta)."""
    return l_inf + b * d ** (-beta)


@dataclass(frozen=True)
class LossFit:
    """:func:`loss_law` fitted to a run's training loss (D in billions of tokens): parameters
    L_inf, B, beta; standard errors of L_inf and beta; L_inf's 95 % interval (± 1.96 SE, cut at
    its bounds) and the bounds."""

    params: dict[str, float]
    se: dict[str, float]
    interval: tuple[float, float]
    bounds: tuple[float, float]

    @property
    def limit(self) -> float:
        """The loss the run converges to, L_inf."""
        return self.params["L_inf"]

    @property
    def limit_on_bound(self) -> bool:
        """L_inf sits on a bound (0, or the lowest observed loss: the curve looks flat)."""
        return _on_bound(self.limit, self.bounds)

    @property
    def limit_undetermined(self) -> str:
        """Why the loss curve does not determine L_inf ('' when it does): on a bound, no finite
        interval, or a 95 % interval reaching 0 — the points cannot rule out a loss of zero, so
        the estimate is an extrapolation the data do not constrain from below."""
        if self.limit_on_bound:
            return "L_inf on its bound"
        lo, hi = self.interval
        if not np.isfinite([lo, hi]).all():
            return "no interval for L_inf (the fit's covariance is not finite)"
        if lo <= self.bounds[0] + 1e-3 * self.bounds[1]:
            return "the 95 % interval of L_inf reaches 0"
        return ""


def _loss_starts(x: Array, y: Array) -> list[tuple[float, ...]]:
    """For each beta: y = L_inf + B * x**(-beta) is linear in (L_inf, B); L_inf held at its
    nearest bound when the free solution leaves [0, min(y)]."""
    starts = []
    for beta in _ALPHAS[_ALPHAS <= LOSS_BETA_MAX]:
        l_inf, b = _lstsq([np.ones_like(x), x ** (-beta)], y)
        if not 0.0 <= l_inf <= y.min():
            l_inf = min(max(l_inf, 0.0), float(y.min()))
            (b,) = _lstsq([x ** (-beta)], y - l_inf)
        starts.append((l_inf, max(b, 0.0), beta))
    return starts


_LOSS = _Form(
    loss_law, ("L_inf", "B", "beta"),
    lambda x, y: ([0.0, 0.0, 1e-6], [float(y.min()), _INF, LOSS_BETA_MAX]),
    _loss_starts, lambda l_inf, b, beta: {"L_inf": l_inf, "B": b, "beta": beta},
)  # fmt: skip


def fit_loss_law(tokens: Array, loss: Array) -> LossFit:
    """Fit :func:`loss_law` to training loss over tokens (counts, not billions), bounded like the
    activation laws' limit: 0 <= L_inf <= the lowest observed loss (a run still learning ends
    above its limit), B >= 0, 0 < beta <= LOSS_BETA_MAX. Grid over beta, linear solve, bounded
    refinement (as :func:`fit_law`); L_inf's interval from the fit's covariance."""
    d = np.asarray(tokens, dtype=np.float64) / TOKENS_PER_UNIT
    y = np.asarray(loss, dtype=np.float64)
    _check_points(d, y, "losses")
    if (y < 0).any():
        raise ValueError("losses must be >= 0")
    # Fitted against D / D[0]: B is then the excess loss at the first point, of order 1 whatever
    # beta (D in billions is ~1e-4 at the quick scale, where D**-beta would reach 1e16).
    x = d / d[0]
    (l_inf, b, beta), pcov = _best(_LOSS, x, y)
    se = {}
    if pcov is not None and np.isfinite(pcov).all():
        se = {"L_inf": float(np.sqrt(max(pcov[0, 0], 0.0))),
              "beta": float(np.sqrt(max(pcov[2, 2], 0.0)))}  # fmt: skip
    bounds = (0.0, float(y.min()))
    half = _Z95 * se.get("L_inf", np.nan)
    interval = (max(l_inf - half, bounds[0]), min(l_inf + half, bounds[1]))
    params = {"L_inf": l_inf, "B": float(b * d[0] ** beta), "beta": beta}
    return LossFit(params, se, interval, bounds)


# --------------------------------------------------------------------------------------------------
# Width-depth ratio: the limit activation ratio rises linearly up to a bottleneck

BOTTLENECK_DRAWS = 1000
_GRID_PER_GAP = 50  # candidate bottlenecks between two neighbouring arms' ratios


def two_segment(r: Array, a: float, below: float, above: float, r_star: float) -> Array:
    """Continuous two-segment line: a + below * min(r, r*) + above * max(r - r*, 0)."""
    return a + below * np.minimum(r, r_star) + above * np.maximum(r - r_star, 0.0)


@dataclass(frozen=True)
class Bottleneck:
    """:func:`two_segment` fitted to (width-depth ratio, limit A0) across arms, the slope of one
    straight line through them, and 95 % percentile intervals over a parametric bootstrap of the
    arms' limits (``intervals``: r_star, below, above, difference = above - below, linear)."""

    r_star: float
    intercept: float
    below: float
    above: float
    linear: float
    intervals: dict[str, tuple[float, float]]
    points: int
    draws: int

    def curve(self, r: Array) -> Array:
        return two_segment(r, self.intercept, self.below, self.above, self.r_star)


def _segments(r: Array, y: Array, grid: Array) -> tuple[Array, Array]:
    """The least-squares two-segment line of each column of ``y`` (arms x columns): per column
    the index of its best r* in ``grid`` and its (a, below, above)."""
    sse, coefs = [], []
    for r_star in grid:
        x = np.stack([np.ones_like(r), np.minimum(r, r_star), np.maximum(r - r_star, 0.0)], 1)
        coef = np.linalg.lstsq(x, y, rcond=None)[0]
        sse.append(((x @ coef - y) ** 2).sum(axis=0))
        coefs.append(coef)
    best = np.argmin(np.stack(sse), axis=0)
    return best, np.stack(coefs)[best, :, np.arange(y.shape[1])]


def fit_bottleneck(
    ratios: Array, limits: Array, intervals: Array, draws: int = BOTTLENECK_DRAWS, seed: int = 0
) -> Bottleneck:
    """The two-segment line through the arms' (width-depth ratio, limit A0), r* by least squares
    over a grid of ``_GRID_PER_GAP`` points per gap between the arms' ratios from the second
    smallest to the largest (at least 2 arms at or below r*, 1 above). ``intervals``: each
    arm's 95 % interval of A0. Each bootstrap draw moves every limit by a normal deviate of SE =
    half the interval's width / 1.96, clipped to the interval (a limit on its bound stays on its
    side), and refits; the intervals are the draws' 2.5 and 97.5 percentiles (fixed seed)."""
    r = np.asarray(ratios, dtype=np.float64)
    y = np.asarray(limits, dtype=np.float64)
    lo, hi = np.asarray(intervals, dtype=np.float64).reshape(-1, 2).T
    if not r.shape == y.shape == lo.shape or r.ndim != 1:
        raise ValueError("ratios, limits and intervals must be one per arm")
    if not (np.isfinite(r).all() and np.isfinite(y).all() and np.isfinite(lo).all()
            and np.isfinite(hi).all()) or (lo > hi).any():  # fmt: skip
        raise ValueError("ratios, limits and intervals must be finite, intervals low <= high")
    knots = np.unique(r)
    if len(knots) < 3:
        raise ValueError(f"need arms of at least 3 distinct ratios, got {len(knots)}")
    grid = np.concatenate([np.linspace(a, b, _GRID_PER_GAP, endpoint=False)
                           for a, b in pairwise(knots[1:])])  # fmt: skip
    se = (hi - lo) / 2 / _Z95
    noise = np.random.default_rng(seed).standard_normal((len(y), draws))
    ys = np.column_stack([y, np.clip(y[:, None] + se[:, None] * noise, lo[:, None], hi[:, None])])
    best, coef = _segments(r, ys, grid)
    linear = np.linalg.lstsq(np.stack([np.ones_like(r), r], 1), ys, rcond=None)[0][1]
    values = {"r_star": grid[best], "below": coef[:, 1], "above": coef[:, 2],
              "difference": coef[:, 2] - coef[:, 1], "linear": linear}  # fmt: skip
    spread = {k: (float(np.percentile(v[1:], 2.5)), float(np.percentile(v[1:], 97.5)))
              for k, v in values.items()}  # fmt: skip
    return Bottleneck(float(grid[best[0]]), float(coef[0, 0]), float(coef[0, 1]),
                      float(coef[0, 2]), float(linear[0]), spread, len(r), draws)  # fmt: skip
