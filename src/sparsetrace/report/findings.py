"""The paper's qualitative findings, each computed on a run: yes / partly / not shown / n/a.

A finding about the end of training is a function of the layer table (percent values), so the
same function also runs on the paper's own tables and fills the paper column. Thresholds are
stated in each evidence string and in docs/report.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from sparsetrace.report import paper
from sparsetrace.report.analysis import RunData
from sparsetrace.report.document import Verdict, fmt_pct

YES, PARTLY, NOT_SHOWN, NA = "yes", "partly", "not shown", "n/a"
NEVER_USED_BAND = (2.5, 10.0)  # "about 5 %": within half to twice the paper's value
STRONG_RANK_CORRELATION = 0.5  # |Spearman rho| for "nearly monotonic" drop order
DEATH_RATE_RATIO = 2.0  # switch-offs per step after warm-up vs during it, for a clear "yes"


@dataclass(frozen=True)
class Finding:
    key: str
    claim: str
    source: str
    paper: Verdict
    check: Callable[[RunData], Verdict]


def _column(layers: pd.DataFrame, column: str) -> pd.Series:
    if column not in layers:
        return pd.Series(dtype=float)
    return layers[column].dropna().sort_index()


def _extreme(
    column: str, highest: bool, last: bool, what: str
) -> Callable[[pd.DataFrame], Verdict]:
    """Is the first (or last) layer the one with the highest (or lowest) value of ``column``?"""

    def check(layers: pd.DataFrame) -> Verdict:
        values = _column(layers, column)
        if len(values) < 2:
            return Verdict(NA, f"needs {what} of at least two layers")
        layer = int(values.index.max() if last else values.index.min())
        others = values.drop(layer)
        best = others.idxmax() if highest else others.idxmin()
        mine = f"layer {layer}: {fmt_pct(values[layer])} %"
        holds = values[layer] >= others.max() if highest else values[layer] <= others.min()
        if holds:
            runner = "next highest" if highest else "next lowest"
            return Verdict(YES, f"{mine}; {runner}: layer {best}, {fmt_pct(others[best])} %")
        which = "highest" if highest else "lowest"
        return Verdict(NOT_SHOWN, f"{mine}; {which}: layer {best}, {fmt_pct(others[best])} %")

    return check


def _spearman(x: list[float], y: list[float]) -> float:
    if len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan")
    return float(stats.spearmanr(x, y).statistic)


def _trend(column: str, rising: bool, what: str) -> Callable[[pd.DataFrame], Verdict]:
    """Does ``column`` rise (fall) with depth: strictly monotone (yes) or only by rank (partly)?"""

    def check(layers: pd.DataFrame) -> Verdict:
        values = _column(layers, column)
        if len(values) < 3:
            return Verdict(NA, f"needs {what} of at least three layers")
        diffs = np.diff(values.to_numpy())
        rho = _spearman(list(values.index), list(values))
        sign = 1 if rising else -1
        chain = " → ".join(fmt_pct(v) for v in values)
        evidence = f"{chain} % (layers {values.index.min()}–{values.index.max()}; ρ = {rho:+.2f})"
        if np.all(sign * diffs > 0):
            return Verdict(YES, f"strictly monotone: {evidence}")
        if sign * rho > 0:
            return Verdict(PARTLY, f"trend but not monotone: {evidence}")
        return Verdict(NOT_SHOWN, evidence)

    return check


def token_batch_correlation(layers: pd.DataFrame) -> float:
    """Pearson r across layers of per-token and per-batch use; NaN below three layers."""
    both = layers[["per_token", "per_batch"]].dropna() if "per_batch" in layers else layers.iloc[:0]
    if len(both) < 3 or both.std().min() == 0:
        return float("nan")
    return float(np.corrcoef(both["per_token"], both["per_batch"])[0, 1])


def _anticorrelation(layers: pd.DataFrame) -> Verdict:
    r = token_batch_correlation(layers)
    if np.isnan(r):
        return Verdict(NA, "needs per-token and per-batch use of three or more layers that vary")
    return Verdict(YES if r < 0 else NOT_SHOWN, f"Pearson r = {r:+.2f} over {len(layers)} layers")


def _first_layer_most_frequent(layers: pd.DataFrame) -> Verdict:
    cols = [c for c in layers.columns if c.startswith("p") and c[1:2].isdigit()]
    cols = [c for c in cols if len(_column(layers, c)) >= 2]
    if not cols:
        return Verdict(NA, "needs rescaled percentiles of at least two layers")
    first = int(layers.index.min())
    top = [c for c in cols if _column(layers, c)[first] >= _column(layers, c).drop(first).max()]
    shown = "p65" if "p65" in cols else cols[0]
    values = _column(layers, shown)
    detail = (
        f"highest in {len(top)} of {len(cols)} percentiles; {shown}: layer {first} "
        f"{fmt_pct(values[first])} % vs others ≤ {fmt_pct(values.drop(first).max())} %"
    )
    verdict = YES if len(top) == len(cols) else PARTLY if top else NOT_SHOWN
    return Verdict(verdict, detail)


def _never_used(layers: pd.DataFrame) -> Verdict:
    values = _column(layers, "never_used")
    if values.empty:
        return Verdict(NA, "needs lifecycle.json")
    lo, hi = NEVER_USED_BAND
    inside = values.between(lo, hi)
    per_layer = ", ".join(fmt_pct(v) for v in values)
    evidence = f"mean {fmt_pct(values.mean())} % (per layer: {per_layer}; band {lo:g}–{hi:g} %)"
    if lo <= values.mean() <= hi:
        return Verdict(YES, evidence)
    return Verdict(PARTLY if inside.any() else NOT_SHOWN, evidence)


def halfway_drop_steps(series: pd.DataFrame, column: str) -> dict[int, int | None]:
    """Per layer, the first step at which ``column`` falls halfway from its first to its last value.

    None where the last value is not below the first (the layer's use does not fall).
    """
    out: dict[int, int | None] = {}
    for layer, group in series.groupby("layer"):
        values = group[column].astype(float).to_numpy()
        steps = group["step"].to_numpy()
        ok = ~np.isnan(values)
        values, steps = values[ok], steps[ok]
        if len(values) < 2 or not values[-1] < values[0]:
            out[int(layer)] = None
            continue
        half = (values[0] + values[-1]) / 2
        out[int(layer)] = int(steps[np.argmax(values <= half)])
    return out


def _drop_order(column: str, what: str) -> Callable[[RunData], Verdict]:
    """Does ``column`` fall first in the top layer, then downwards (Figure 2)?"""

    def check(rd: RunData) -> Verdict:
        if rd.series.empty or column not in rd.series:
            return Verdict(NA, f"no {what} measurements")
        drops = halfway_drop_steps(rd.series, column)
        fell = {k: v for k, v in drops.items() if v is not None}
        if len(fell) < 2:
            return Verdict(NA, f"{what} falls in fewer than two layers")
        order = sorted(fell, key=lambda k: (fell[k], -k))
        rho = _spearman(list(fell), list(fell.values()))
        top = max(drops)
        top_first = top in fell and fell[top] == min(fell.values())
        flat = [k for k, v in drops.items() if v is None]
        evidence = (
            "halfway-drop order: "
            + ", ".join(f"L{k} @{fell[k]}" for k in order)
            + f" (ρ(layer, step) = {rho:+.2f})"
            + (f"; no drop in layer {', '.join(map(str, flat))}" if flat else "")
        )
        if top_first and rho <= -STRONG_RANK_CORRELATION:
            return Verdict(YES, evidence)
        if top_first or rho < 0:
            return Verdict(PARTLY, evidence)
        return Verdict(NOT_SHOWN, evidence)

    return check


def _death_timing(rd: RunData) -> dict[str, float] | None:
    """Switch-offs (all layers) after warm-up vs the share of the measured span after warm-up.

    An interval's switch-offs count at its end step. None without warm-up, transitions or a run
    past the warm-up.
    """
    warmup = rd.warmup_steps
    rows = [t for t in rd.transitions.values() if len(t) > 1]
    if warmup is None or not rows:
        return None
    first = min(int(t["step"].iloc[0]) for t in rows)
    last = max(int(t["step"].iloc[-1]) for t in rows)
    if last <= warmup or first >= warmup:
        return None
    offs = pd.concat([t.iloc[1:][["step", "off"]] for t in rows]).groupby("step")["off"].sum()
    total = float(offs.sum())
    after = float(offs[offs.index > warmup].sum())
    span_after = (last - warmup) / (last - first)
    cumulative = offs.cumsum()
    half_step = (
        int(cumulative.index[np.argmax(cumulative.to_numpy() >= total / 2)]) if total else -1
    )
    return {
        "warmup": warmup, "first": first, "last": last, "total": total,
        "share_after": after / total if total else float("nan"),
        "span_after": span_after, "half_step": half_step,
    }  # fmt: skip


def _deaths_after_warmup(rd: RunData) -> Verdict:
    t = _death_timing(rd)
    if t is None:
        if not rd.transitions:
            reason = "needs lifecycle.json"
        elif rd.warmup_steps is None:
            reason = "warm-up length unknown (train.warmup_steps in meta.json or config.yaml)"
        else:
            reason = "needs lifecycle transitions measured before and after the end of warm-up"
        return Verdict(NA, reason)
    if t["total"] == 0:
        return Verdict(NOT_SHOWN, "no unit switched off during the measured span")
    share, span = t["share_after"], t["span_after"]
    before_rate = (1 - share) / (1 - span)
    ratio = float("inf") if before_rate == 0 else (share / span) / before_rate
    rate = "none during warm-up" if before_rate == 0 else f"rate after / during warm-up {ratio:.1f}"
    evidence = (
        f"{100 * share:.0f} % of {int(t['total'])} switch-offs came after warm-up "
        f"(step {int(t['warmup'])}), which is {100 * span:.0f} % of the measured steps; "
        f"{rate}; half of all switch-offs by step {int(t['half_step'])}"
    )
    verdict = YES if ratio >= DEATH_RATE_RATIO else PARTLY if ratio > 1 else NOT_SHOWN
    return Verdict(verdict, evidence)


def _table_finding(
    key: str, claim: str, source: str, check: Callable[[pd.DataFrame], Verdict]
) -> Finding:
    return Finding(key, claim, source, check(paper.layer_table()), lambda rd: check(rd.layers))


FINDINGS: list[Finding] = [
    _table_finding(
        "first_fewest_batch", "The first layer uses the fewest units per batch",
        "§3, Table 1", _extreme("per_batch", highest=False, last=False, what="per-batch use"),
    ),
    _table_finding(
        "last_most_batch", "The last layer uses the most units per batch",
        "§3, Table 1", _extreme("per_batch", highest=True, last=True, what="per-batch use"),
    ),
    Finding(
        "token_batch_anticorrelation",
        "Per-token and per-batch use anticorrelate across layers (r < 0)", "§3",
        Verdict(YES, f"stated r = {paper.TOKEN_BATCH_CORRELATION:+.2f} (Table 1's printed values "
                f"give r = {token_batch_correlation(paper.layer_table()):+.2f})"),
        lambda rd: _anticorrelation(rd.layers),
    ),
    _table_finding(
        "first_batch_falls", "Use at the first batch falls with depth", "§3.1, Table 2",
        _trend("on_first_batch", rising=False, what="use at the first batch"),
    ),
    _table_finding(
        "turned_on_rises", "“Turned on” rises with depth", "§3.1, Table 2",
        _trend("turned_on", rising=True, what="turned-on shares"),
    ),
    _table_finding(
        "first_turns_off_most", "The first layer turns off the most units", "§1, Table 2",
        _extreme("turned_off", highest=True, last=False, what="turned-off shares"),
    ),
    Finding(
        "per_token_drops_top_first",
        "Early in training, per-token use drops first in the top layers", "§3.2, Fig. 2a",
        Verdict(YES, paper.TRAINING_FINDINGS["per_token_drop_order"]),
        _drop_order("per_token_frac", "per-token use"),
    ),
    Finding(
        "p50_drops_top_first",
        "Early in training, median (p50) use drops first in the top layers", "§3.2, Fig. 2b",
        Verdict(YES, paper.TRAINING_FINDINGS["p50_drop_order"]),
        _drop_order("p50", "50th-percentile use"),
    ),
    _table_finding(
        "first_most_frequent",
        "The first layer uses each of its units on the largest share of a sequence",
        "§4.3, Table 3", _first_layer_most_frequent,
    ),
    Finding(
        "deaths_after_warmup",
        "Units die mostly after warm-up ends, not uniformly over training", "§4.2, Fig. 1",
        Verdict(YES, paper.TRAINING_FINDINGS["deaths_after_warmup"]),
        _deaths_after_warmup,
    ),
    Finding(
        "never_used", "About 5 % of units are never used", "§1",
        Verdict(YES, f"about {paper.NEVER_USED_PCT:g} % of each layer (no per-layer values)"),
        lambda rd: _never_used(rd.layers),
    ),
]  # fmt: skip


def evaluate(rd: RunData) -> dict[str, Verdict]:
    """Every finding checked on one run, by key."""
    return {f.key: f.check(rd) for f in FINDINGS}
