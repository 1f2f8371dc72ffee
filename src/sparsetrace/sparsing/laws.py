"""Activation ratio vs training tokens: the Sparsing Law's power laws and the log baseline.

Sparsing Law, "Laws" (D = training tokens in billions):
- ReLU, a decreasing "logspace power law": ``A(D) = exp(-c * D**alpha + b) + A0``;
- SiLU, increasing and converging: ``A(D) = -c * D**(-alpha) + A0``;
- the logarithmic baseline they are compared with by MAE and MSE: ``A0 + c * log(a*D + b)``.

Fitting (scipy ``curve_fit``, trust-region reflective with bounds alpha > 0, c >= 0, and
a*D + b > 0 on the data for the log form): for fixed alpha (and A0 for ReLU, b/a for log) each
form is linear in its remaining parameters, so a grid over those nonlinear ones with a linear
least-squares solve at each point gives robust starting points; the best few are refined and the
fit with the lowest MSE wins. Deterministic: no random starts. The log form is fitted with a = 1:
``c*log(a*D + b)`` equals ``c*log(a) + c*log(D + b/a)``, so a only trades off against A0 and b.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import OptimizeWarning, curve_fit

from sparsetrace.errors import UserError

FORMS = ("relu", "silu")
MIN_POINTS = 5  # more points than the 4 parameters of the ReLU law
TOKENS_PER_UNIT = 1e9  # D is in billions of tokens
_ALPHAS = np.geomspace(0.02, 4.0, 40)
_REFINED = 6  # best grid starts refined by curve_fit

Array = np.ndarray


def relu_law(d: Array, alpha: float, b: float, c: float, a0: float) -> Array:
    """Sparsing Law, ReLU: A(D) = exp(-c * D**alpha + b) + A0."""
    return np.exp(-c * d**alpha + b) + a0


def silu_law(d: Array, alpha: float, c: float, a0: float) -> Array:
    """Sparsing Law, SiLU: A(D) = -c * D**(-alpha) + A0."""
    return -c * d ** (-alpha) + a0


def log_law(d: Array, a: float, b: float, c: float, a0: float) -> Array:
    """Sparsing Law, logarithmic baseline: A(D) = A0 + c * log(a*D + b)."""
    return a0 + c * np.log(a * d + b)


@dataclass(frozen=True)
class LawFit:
    """A fitted form: its parameters by name (None: not part of the form), MAE and MSE."""

    form: str
    params: dict[str, float | None]
    mae: float
    mse: float
    baseline: LawFit | None = None

    def curve(self, d: Array) -> Array:
        """The fitted A at D (billions of tokens)."""
        p = self.params
        if self.form == "relu":
            return relu_law(d, p["alpha"], p["b"], p["c"], p["A0"])
        if self.form == "silu":
            return silu_law(d, p["alpha"], p["c"], p["A0"])
        return log_law(d, p["a"], p["b"], p["c"], p["A0"])

    def to_dict(self) -> dict:
        out = {"form": self.form, "params": self.params, "mae": self.mae, "mse": self.mse}
        if self.baseline is not None:
            out["baseline"] = self.baseline.to_dict()
        return out


@dataclass(frozen=True)
class _Form:
    """A law as fitted: f(D, *free), the free parameters' bounds, grid starts, and how the free
    parameters map to the reported ones."""

    f: Callable[..., Array]
    bounds: Callable[[Array], tuple[list[float], list[float]]]
    starts: Callable[[Array, Array], list[tuple[float, ...]]]
    report: Callable[..., dict[str, float | None]]


def _lstsq(columns: list[Array], y: Array) -> Array:
    return np.linalg.lstsq(np.stack(columns, axis=1), y, rcond=None)[0]


def _relu_starts(d: Array, y: Array) -> list[tuple[float, ...]]:
    """For each alpha and a floor A0 below min(y): log(y - A0) = b - c * D**alpha is linear."""
    spread = max(float(np.ptp(y)), 1e-12)
    floors = float(y.min()) - spread * np.array([1e-3, 1e-2, 0.05, 0.2, 1.0])
    starts = []
    for alpha in _ALPHAS:
        for a0 in floors:
            b, c = _lstsq([np.ones_like(d), -(d**alpha)], np.log(y - a0))
            starts.append((alpha, b, max(c, 0.0), a0))
    return starts


def _silu_starts(d: Array, y: Array) -> list[tuple[float, ...]]:
    """For each alpha: y = A0 - c * D**(-alpha) is linear in (c, A0)."""
    starts = []
    for alpha in _ALPHAS:
        a0, c = _lstsq([np.ones_like(d), -(d ** (-alpha))], y)
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


_INF = np.inf
_FORMS = {
    "relu": _Form(
        relu_law, lambda d: ([1e-6, -_INF, 0.0, -_INF], [_INF] * 4), _relu_starts,
        lambda alpha, b, c, a0: {"alpha": alpha, "b": b, "c": c, "A0": a0},
    ),
    "silu": _Form(
        silu_law, lambda d: ([1e-6, 0.0, -_INF], [_INF] * 3), _silu_starts,
        lambda alpha, c, a0: {"alpha": alpha, "b": None, "c": c, "A0": a0},
    ),
    "log": _Form(
        lambda d, b, c, a0: log_law(d, 1.0, b, c, a0),
        lambda d: ([_log_lowest_b(d), -_INF, -_INF], [_INF] * 3), _log_starts,
        lambda b, c, a0: {"a": 1.0, "b": b, "c": c, "A0": a0},
    ),
}  # fmt: skip


def _mse(form: _Form, d: Array, y: Array, params: tuple[float, ...]) -> float:
    with np.errstate(all="ignore"):
        err = float(np.mean((form.f(d, *params) - y) ** 2))
    return err if np.isfinite(err) else np.inf


def _fit_form(name: str, d: Array, y: Array) -> LawFit:
    form = _FORMS[name]
    lower, upper = (np.array(v) for v in form.bounds(d))
    starts = sorted(form.starts(d, y), key=lambda p: _mse(form, d, y, p))[:_REFINED]
    candidates = list(starts)
    for p0 in starts:
        try:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore", OptimizeWarning)
                popt, _ = curve_fit(
                    form.f, d, y, p0=np.clip(p0, lower, upper), bounds=(lower, upper),
                    method="trf", maxfev=20000,
                )  # fmt: skip
            candidates.append(tuple(popt))
        except (RuntimeError, ValueError):  # no convergence from this start: the others remain
            continue
    best = min(candidates, key=lambda p: _mse(form, d, y, p))
    with np.errstate(all="ignore"):
        resid = form.f(d, *best) - y
    params = {k: None if v is None else float(v) for k, v in form.report(*best).items()}
    return LawFit(name, params, float(np.mean(np.abs(resid))), float(np.mean(resid**2)))


def fit_law(tokens: Array, ratio: Array, form: str = "relu") -> LawFit:
    """Fit the Sparsing Law's ``form`` ('relu' or 'silu') and the log baseline to activation
    ratios over training tokens (counts, not billions); the baseline is in ``.baseline``."""
    if form not in FORMS:
        raise ValueError(f"unknown law form {form!r} ({', '.join(FORMS)})")
    d = np.asarray(tokens, dtype=np.float64) / TOKENS_PER_UNIT
    y = np.asarray(ratio, dtype=np.float64)
    if d.shape != y.shape or d.ndim != 1:
        raise ValueError(f"tokens and ratio must be 1-D of one length; got {d.shape}, {y.shape}")
    if len(d) < MIN_POINTS:
        raise ValueError(f"need at least {MIN_POINTS} points to fit, got {len(d)}")
    if not (np.isfinite(d).all() and np.isfinite(y).all()) or (d <= 0).any():
        raise ValueError("tokens must be positive and finite, ratios finite")
    fit = _fit_form(form, d, y)
    return LawFit(fit.form, fit.params, fit.mae, fit.mse, baseline=_fit_form("log", d, y))


def read_law_data(path: Path) -> tuple[Array, Array]:
    """(tokens, activation ratio) from a CSV (columns tokens, activation_ratio), a run directory
    (its sparsing_law.csv, layer 'all') or the authors' JSON ({"token_passed", "activation_ratio"},
    recognised by its content: their files are named .txt). Bad input: UserError."""
    path = Path(path)
    if path.is_dir():
        csv = path / "sparsing_law.csv"
        if not csv.is_file():
            raise UserError(f"{path}: no sparsing_law.csv (run `sparsetrace sparsing-law {path}`)")
        frame = _read_csv(csv)
        if "layer" in frame.columns:
            frame = frame[frame["layer"].astype(str) == "all"]
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
    if not (np.isfinite(tokens).all() and np.isfinite(ratio).all()) or (tokens <= 0).any():
        raise UserError(f"{path}: tokens must be positive numbers and ratios finite")
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
