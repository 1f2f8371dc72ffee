"""The paper's findings, each decided on a run by its rule in :mod:`sparsetrace.claims`.

This module turns a prepared run (:class:`RunData`) into the inputs of the rules: end-of-training
estimates with their standard errors, lifecycle shares with binomial errors, halfway-drop steps,
permanent deaths. The paper column applies the same rules to the paper's published tables, or
says "stated in the text, no data" where the paper publishes no numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from sparsetrace import paper
from sparsetrace.claims import NA, RULES, Rule, Verdict
from sparsetrace.claims import rules as r
from sparsetrace.claims.stats import Estimate, binomial_se_pct, window_estimate
from sparsetrace.report.rundata import RunData

Layers = dict[int, Estimate]


@dataclass(frozen=True)
class Finding:
    key: str  # the rule's key in sparsetrace.claims.RULES
    claim: str  # short, for the table
    paper_check: Callable[[], Verdict]  # the rule on the paper's tables (sparsetrace.paper)
    check: Callable[[RunData], Verdict]

    @property
    def rule(self) -> Rule:
        return RULES[self.key]

    @property
    def paper(self) -> Verdict:
        """Computed from the published tables each time it is asked for, never stored."""
        return self.paper_check()


# ---------------------------------------------------------------------------------------------
# Inputs of the rules


def end_window_steps(rd: RunData) -> list[int]:
    """The measured steps of the end-of-training window (see claims.rules.END_WINDOW)."""
    if rd.series.empty or rd.end_step is None:
        return []
    steps = sorted(int(s) for s in rd.series["step"].unique() if s <= rd.end_step)
    total = max(rd.planned_steps or 0, steps[-1])
    window = [s for s in steps if s >= steps[-1] - r.END_WINDOW * total]
    return window if len(window) >= r.END_MEASUREMENTS else steps[-r.END_MEASUREMENTS :]


def end_estimates(rd: RunData, column: str) -> Layers:
    """Per layer: mean and standard error of ``column`` (a fraction) over the end window, in %."""
    steps = end_window_steps(rd)
    if not steps or column not in rd.series:
        return {}
    window = rd.series[rd.series["step"].isin(steps)]
    return {
        int(layer): window_estimate(100 * group[column].astype(float).to_numpy())
        for layer, group in window.groupby("layer")
    }


def end_total(rd: RunData, column: str) -> Estimate:
    """Over all layers, unit-weighted: sum of ``column`` (units) / sum of widths, in %, as mean
    and standard error over the end window."""
    steps = end_window_steps(rd)
    if not steps or column not in rd.series:
        return Estimate(math.nan, math.nan, 0)
    window = rd.series[rd.series["step"].isin(steps)]
    sums = window.groupby("step")[[column, "hidden"]].sum()
    return window_estimate((100 * sums[column] / sums["hidden"]).to_numpy())


def unit_shares(layers: pd.DataFrame, column: str, units: dict[int, int] | None) -> Layers:
    """Per layer: a lifecycle share (%) with its binomial standard error (0 without unit
    counts: the paper's printed values, decided to the print precision)."""
    if column not in layers:
        return {}
    out = {}
    for layer, value in layers[column].dropna().items():
        n = (units or {}).get(int(layer), 0)
        out[int(layer)] = Estimate(float(value), binomial_se_pct(value, n) if n else 0.0)
    return out


def published(column: str) -> Layers:
    """The paper's value per layer, taken as exact (ties decided by the print precision)."""
    return unit_shares(paper.layer_table(), column, None)


def lifecycle_units(rd: RunData) -> dict[int, int]:
    return {int(k): int(v.get("hidden", 0)) for k, v in rd.run.lifecycle.get("layers", {}).items()}


def halfway_drop_steps(series: pd.DataFrame, column: str) -> dict[int, int | None]:
    """Per layer, the first measured step at which ``column`` is at or below halfway between its
    first and its last value; None where the last value is not at least DROP_FRACTION below the
    first (the layer does not drop)."""
    out: dict[int, int | None] = {}
    for layer, group in series.groupby("layer"):
        values = group[column].astype(float).to_numpy()
        steps = group["step"].to_numpy()
        ok = ~np.isnan(values)
        values, steps = values[ok], steps[ok]
        if len(values) < 2 or not values[-1] < values[0] * (1 - r.DROP_FRACTION):
            out[int(layer)] = None
            continue
        half = (values[0] + values[-1]) / 2
        out[int(layer)] = int(steps[np.argmax(values <= half)])
    return out


def measuring_interval(rd: RunData) -> int | None:
    """The most common gap between measured steps (trace.every)."""
    steps = np.sort(rd.series["step"].unique()) if not rd.series.empty else np.array([])
    if len(steps) < 2:
        return None
    gaps, counts = np.unique(np.diff(steps), return_counts=True)
    return int(gaps[np.argmax(counts)])


@dataclass(frozen=True)
class Deaths:
    """Permanent deaths of a run (all layers): last-used steps, the span they can be told from
    flickers in, and the switch-offs that were undone."""

    steps: list[int]
    first: int
    last: int
    eligible_end: int
    flickers: int


def permanent_deaths(rd: RunData) -> Deaths | None:
    """From lifecycle.json: a unit is dead when it was used, then unused in every measured batch
    from its last use to the end, and that last use lies at least DEAD_MIN_OFF of the run before
    the last measurement (later ones are censored: they may still come back)."""
    layers = rd.run.lifecycle.get("layers", {})
    if not layers or not rd.transitions:
        return None
    measured = sorted({int(s) for t in rd.transitions.values() for s in t["step"]})
    if len(measured) < 2:
        return None
    first, last = measured[0], measured[-1]
    total = max(rd.planned_steps or 0, last)
    eligible_end = int(last - max(r.DEAD_MIN_OFF * total, 0))
    deaths, flickers = [], 0
    for key, layer in layers.items():
        last_used = np.asarray(layer.get("last_step_used") or [], dtype=np.int64)
        off_at_end = (last_used >= 0) & (last_used < last)
        deaths += [int(s) for s in last_used[off_at_end] if s <= eligible_end]
        switched_off = int(rd.transitions[int(key)]["off"].sum()) if int(key) in rd.transitions \
            else 0  # fmt: skip
        flickers += max(0, switched_off - int(off_at_end.sum()))
    return Deaths(sorted(deaths), first, last, eligible_end, flickers)


# ---------------------------------------------------------------------------------------------
# The checks


def _extreme(target: str, highest: bool, what: str) -> Callable[[Layers], Verdict]:
    def check(values: Layers) -> Verdict:
        if not values:
            return Verdict(NA, f"needs {what}")
        layer = max(values) if target == "last" else min(values)
        return r.layer_extreme(values, layer, highest, what)

    return check


def _check_end(column: str, decide: Callable[[Layers], Verdict]) -> Callable[[RunData], Verdict]:
    def check(rd: RunData) -> Verdict:
        if not rd.has_metrics:
            return Verdict(NA, "no sparsity measurements (trace.every 0?)")
        return decide(end_estimates(rd, column))

    return check


def _check_lifecycle(
    column: str, decide: Callable[[Layers], Verdict]
) -> Callable[[RunData], Verdict]:
    def check(rd: RunData) -> Verdict:
        if not rd.transitions:
            return Verdict(NA, "needs lifecycle.json (a traced run)")
        return decide(unit_shares(rd.layers, column, lifecycle_units(rd)))

    return check


def _order(rising: bool, what: str) -> Callable[[Layers], Verdict]:
    return lambda values: r.layer_order(sorted(values.items()), rising, what)


def _never_used(values: Layers) -> Verdict:
    return r.per_layer_band({f"L{k}": v for k, v in sorted(values.items())},
                            paper.NEVER_USED_PCT, "never-used shares")  # fmt: skip


def _anticorrelation(token: Layers, batch: Layers) -> Verdict:
    layers = sorted(set(token) & set(batch))
    return r.anticorrelation([token[k].value for k in layers], [batch[k].value for k in layers])


def _run_anticorrelation(rd: RunData) -> Verdict:
    if not rd.has_metrics:
        return Verdict(NA, "no sparsity measurements")
    token, batch = end_estimates(rd, "per_token_frac"), end_estimates(rd, "per_batch_frac")
    return _anticorrelation(token, batch)


def _paper_anticorrelation() -> Verdict:
    v = _anticorrelation(published("per_token"), published("per_batch"))
    text = f"Table 1: {v.evidence}; the text states r = {paper.TOKEN_BATCH_CORRELATION:+.2f}"
    return Verdict(v.outcome, text, v.decide)


def _drop_order(column: str, what: str) -> Callable[[RunData], Verdict]:
    def check(rd: RunData) -> Verdict:
        if not rd.has_metrics or column not in rd.series:
            return Verdict(NA, f"no {what} measurements")
        measured = rd.series["step"].nunique()
        halfway = halfway_drop_steps(rd.series, column)
        return r.drop_order(halfway, measuring_interval(rd), what, measured)

    return check


def _deaths(rd: RunData) -> Verdict:
    if not rd.transitions:
        return Verdict(NA, "needs lifecycle.json (a traced run)")
    if rd.warmup_steps is None:
        return Verdict(NA, "warm-up length unknown (train.warmup_steps in meta.json)")
    d = permanent_deaths(rd)
    if d is None:
        return Verdict(NA, "needs two or more measured steps", "measure more often")
    boundary = r.HIGH_LR_WARMUPS * rd.warmup_steps
    return r.death_timing(d.steps, d.first, boundary, d.eligible_end, d.flickers)


def _both(key: str, claim: str, column: str, run_col: str, decide: Callable[[Layers], Verdict],
          lifecycle: bool = False) -> Finding:  # fmt: skip
    """A finding about the end of training: the same rule on the paper's table and the run."""
    check = _check_lifecycle(run_col, decide) if lifecycle else _check_end(run_col, decide)
    return Finding(key, claim, lambda: decide(published(column)), check)


FINDINGS: list[Finding] = [
    _both("first_fewest_batch", "The first layer uses the fewest units per batch", "per_batch",
          "per_batch_frac", _extreme("first", False, "per-batch use")),
    _both("last_most_batch", "The last layer uses the most units per batch", "per_batch",
          "per_batch_frac", _extreme("last", True, "per-batch use")),
    Finding("token_batch_anticorrelation",
            "Per-token and per-batch use anticorrelate across layers",
            _paper_anticorrelation, _run_anticorrelation),
    _both("first_batch_falls", "Use at the first batch falls with depth", "on_first_batch",
          "on_first_batch", _order(False, "use at the first batch"), lifecycle=True),
    _both("turned_on_rises", "“Turned on” rises with depth", "turned_on", "turned_on",
          _order(True, "turned-on shares"), lifecycle=True),
    _both("first_turns_off_most", "The first layer turns off the most units", "turned_off",
          "turned_off", _extreme("first", True, "turned-off shares"),
          lifecycle=True),
    Finding("per_token_drops_top_first",
            "Early in training, per-token use drops first in the top layers",
            lambda: RULES["per_token_drops_top_first"].no_data(
                "§3.2, Fig. 2a: a plot, no published steps"),
            _drop_order("per_token_frac", "per-token use")),
    Finding("p50_drops_top_first",
            "Early in training, median (p50) use drops first in the top layers",
            lambda: RULES["p50_drops_top_first"].no_data(
                "§3.2, Fig. 2b: a plot, no published steps"),
            _drop_order("p50", "50th-percentile use")),
    _both("first_most_frequent",
          "The first layer uses each of its units on the largest share of a sequence", "p65",
          "p65", _extreme("first", True, "the 65th percentile")),
    Finding("deaths_after_high_lr",
            "Units die mostly after the high-LR phase, not uniformly over training",
            lambda: RULES["deaths_after_high_lr"].no_data(
                "§4.2, Fig. 1: 'very few ... for the first 8000 steps', no counts published"),
            _deaths),
    _both("never_used", "About 5 % of each layer's units are never used", "never_used",
          "never_used", _never_used, lifecycle=True),
]  # fmt: skip


def evaluate(rd: RunData) -> dict[str, Verdict]:
    """Every finding decided on one run, by key."""
    return {f.key: f.check(rd) for f in FINDINGS}


def token_batch_correlation(layers: pd.DataFrame) -> float:
    """Pearson r across layers of per-token and per-batch use; NaN below three varying layers
    (shown in the tables; the verdict uses :func:`sparsetrace.claims.rules.anticorrelation`)."""
    both = layers[["per_token", "per_batch"]].dropna() if "per_batch" in layers else layers.iloc[:0]
    if len(both) < 3 or both.std().min() == 0:
        return math.nan
    return float(np.corrcoef(both["per_token"], both["per_batch"])[0, 1])
