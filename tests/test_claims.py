"""Every decision rule says 'holds' on a hand-built case that must hold, 'does not hold' on one
that must not, and (where the rule has one) 'inconclusive' on one it cannot decide; the
statistics behind them equal scipy's / a hand computation."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from sparsetrace import paper
from sparsetrace.claims import FAILS, HOLDS, INCONCLUSIVE, NA, NO_DATA, RULES, Verdict
from sparsetrace.claims import rules as r
from sparsetrace.claims.stats import (
    Estimate,
    binomial_se_pct,
    pairwise_order,
    pearson_ci,
    rate_ratio,
    seeds_for_equivalence,
    tost_p,
    welch,
    window_estimate,
)
from sparsetrace.sparsing.laws import fit_bottleneck, two_segment

E = Estimate
Case = Callable[[], Verdict]


def _layers(*values: float, se: float = 0.0) -> dict[int, Estimate]:
    return {i: E(v, se) for i, v in enumerate(values)}


def _seeds(center: float, spread: float, n: int = 5) -> list[float]:
    """n values with mean ``center`` and sample standard deviation ``spread``."""
    z = np.linspace(-1, 1, n)
    return list(center + spread * z / z.std(ddof=1))


def _verdicts(*pairs: tuple[str, str]) -> dict[str, Verdict]:
    return {name: Verdict(outcome, "x") for name, outcome in pairs}


def _extreme(values: dict[int, Estimate], highest: bool, last: bool = False) -> Verdict:
    return r.layer_extreme(values, max(values) if last else 0, highest, "use")


def _deaths(during: int, after: int) -> Verdict:
    """Deaths spread evenly over steps 0-160 (high LR) and 160-900."""
    steps = [int(s) for s in np.linspace(1, 160, during)] + [
        int(s) for s in np.linspace(161, 900, after)
    ]
    return r.death_timing(steps, 0, 160, 900, flickers=3)


def _mask_equivalence(spread: float, shift: float) -> Verdict:
    control = _seeds(4.50, spread)
    dead = [v + shift for v in _seeds(4.50, spread)[::-1]]
    acc_c, acc_d = _seeds(0.25, spread / 100), [v - shift / 100 for v in _seeds(0.25, spread / 100)]
    return r.equivalence(welch(dead, control), welch(acc_d, acc_c), 5, 5)


def _collapse(shift: float, dead_shift: float = 0.0, spread: float = 0.005) -> Verdict:
    control, dead = _seeds(4.5, spread), _seeds(4.5 + dead_shift, spread)
    random = _seeds(4.5 + shift, spread)
    return r.collapse(welch(random, control), welch(random, dead), 5, 5)


WIDTH_DEPTH = np.array([2.9, 6.7, 13.3, 24.0, 51.2, 106.7, 192.0, 544.0])  # the cpu arms' ratios


def _bottleneck(below: float, above: float, half: float, arms: int = 8) -> Verdict:
    """Limit A0 over the width-depth ratio: a two-segment line breaking at 114 (the paper's
    bottleneck), each arm's limit known to ± ``half``."""
    ratios = WIDTH_DEPTH[:arms]
    limits = two_segment(ratios, 0.1, below, above, 114.0)
    fit = fit_bottleneck(ratios, limits, np.stack([limits - half, limits + half], axis=1))
    return r.bottleneck(fit, arms)


# rule key -> {outcome: case}. A rule replaced by "always holds" fails its FAILS case.
CASES: dict[str, dict[str, Case]] = {
    "first_fewest_batch": {
        HOLDS: lambda: _extreme(_layers(13.3, 79.3, 71.0, se=0.3), highest=False),
        FAILS: lambda: _extreme(_layers(80.0, 70.0, 90.0, se=0.3), highest=False),
        INCONCLUSIVE: lambda: _extreme(_layers(70.0, 70.5, 90.0, se=0.5), highest=False),
    },
    "last_most_batch": {
        HOLDS: lambda: _extreme(_layers(13.3, 79.3, 95.6, se=0.3), True, last=True),
        FAILS: lambda: _extreme(_layers(13.3, 99.0, 95.6, se=0.3), True, last=True),
        INCONCLUSIVE: lambda: _extreme(_layers(13.3, 95.0, 95.6, se=0.4), True, last=True),
    },
    "token_batch_anticorrelation": {
        HOLDS: lambda: r.anticorrelation([1, 2, 3, 4, 5, 6], [60, 50, 41, 30, 22, 10]),
        FAILS: lambda: r.anticorrelation([1, 2, 3, 4, 5, 6], [10, 22, 30, 41, 50, 60]),
        INCONCLUSIVE: lambda: r.anticorrelation(
            [4.1, 6.8, 7.1, 6.4, 2.6, 3.0], [13.3, 79.3, 71.0, 73.0, 86.1, 95.6]
        ),
    },
    "first_batch_falls": {
        HOLDS: lambda: r.layer_order(list(_layers(97, 93, 91, 89, 88, 87.5).items()), False, "x"),
        FAILS: lambda: r.layer_order(list(_layers(100, 100, 100, 100).items()), False, "x"),
        INCONCLUSIVE: lambda: r.layer_order(list(_layers(97, 90, 98, 89).items()), False, "x"),
    },
    "turned_on_rises": {
        HOLDS: lambda: r.layer_order(list(_layers(0.05, 1.7, 2.6, 4.3).items()), True, "x"),
        FAILS: lambda: r.layer_order(list(_layers(4.3, 2.6, 1.7, 0.05).items()), True, "x"),
        INCONCLUSIVE: lambda: r.layer_order(list(_layers(1, 3, 2, 2.5).items()), True, "x"),
    },
    "first_turns_off_most": {
        HOLDS: lambda: _extreme(_layers(83.8, 15.6, 22.5, se=0.5), highest=True),
        FAILS: lambda: _extreme(_layers(0.0, 6.4, 3.8, se=0.5), highest=True),
        INCONCLUSIVE: lambda: _extreme(_layers(6.0, 6.4, 3.8, se=0.5), highest=True),
    },
    "per_token_drops_top_first": {
        HOLDS: lambda: r.drop_order({0: 300, 1: 240, 2: 180, 3: 120}, 20, "x", 50),
        FAILS: lambda: r.drop_order({0: 120, 1: 180, 2: 240, 3: 300}, 20, "x", 50),
        INCONCLUSIVE: lambda: r.drop_order({0: 300, 1: 240, 2: 120, 3: 120}, 20, "x", 50),
    },
    "p50_drops_top_first": {
        HOLDS: lambda: r.drop_order({0: None, 1: 200, 2: 100}, 20, "x", 50),
        FAILS: lambda: r.drop_order({0: 100, 1: 200, 2: None}, 20, "x", 50),
        INCONCLUSIVE: lambda: r.drop_order({0: 300, 1: 100, 2: 100}, 20, "x", 50),
    },
    "first_most_frequent": {
        HOLDS: lambda: _extreme(_layers(31.3, 2.9, 3.2, se=0.2), highest=True),
        FAILS: lambda: _extreme(_layers(2.0, 2.9, 3.2, se=0.2), highest=True),
        INCONCLUSIVE: lambda: _extreme(_layers(3.1, 2.9, 3.2, se=0.2), highest=True),
    },
    "deaths_after_high_lr": {
        HOLDS: lambda: _deaths(during=2, after=400),
        FAILS: lambda: _deaths(during=40, after=185),  # the same rate in both phases
        INCONCLUSIVE: lambda: _deaths(during=0, after=3),  # three deaths: no "dramatic" proof
    },
    "never_used": {
        HOLDS: lambda: r.per_layer_band({"L0": E(5.0, 0.5), "L1": E(4.0, 0.4)}, 5.0, "x"),
        FAILS: lambda: r.per_layer_band({"L0": E(5.0, 0.5), "L1": E(0.3, 0.1)}, 5.0, "x"),
        INCONCLUSIVE: lambda: r.per_layer_band({"L0": E(5.0, 0.5), "L1": E(2.3, 0.5)}, 5.0, "x"),
    },
    "mask_dead_equivalent": {
        HOLDS: lambda: _mask_equivalence(spread=0.004, shift=0.001),
        FAILS: lambda: _mask_equivalence(spread=0.004, shift=0.1),
        INCONCLUSIVE: lambda: _mask_equivalence(spread=0.05, shift=0.0),
    },
    "mask_random_collapse": {
        HOLDS: lambda: _collapse(shift=0.5),
        FAILS: lambda: _collapse(shift=0.01),
        INCONCLUSIVE: lambda: _collapse(shift=0.11, spread=0.05),
    },
    "mask_fraction_about_30": {
        HOLDS: lambda: r.per_layer_band({"all": E(29.0, 1.0)}, 30.0, "x"),
        FAILS: lambda: r.per_layer_band({"all": E(4.0, 1.0)}, 30.0, "x"),
        INCONCLUSIVE: lambda: r.per_layer_band({"all": E(14.0, 1.0)}, 30.0, "x"),
    },
    "mask_pruned_equal": {
        HOLDS: lambda: r.pruned_equal(3e-7, ""),
        FAILS: lambda: r.pruned_equal(0.02, ""),
    },
    "capacity_similar_fraction": {
        HOLDS: lambda: r.similar_fractions({0: E(-4.5), 1: E(-1.1), 2: E(4.7)}),
        FAILS: lambda: r.similar_fractions({0: E(-4.5), 1: E(25.0, 1.0)}),
        INCONCLUSIVE: lambda: r.similar_fractions({0: E(-4.5), 1: E(9.0, 2.0)}),
    },
    "capacity_round2_worse": {
        HOLDS: lambda: r.worse_by(welch(_seeds(4.8, 0.01, 3), _seeds(4.5, 0.01, 3)), 3, 3),
        FAILS: lambda: r.worse_by(welch(_seeds(4.5, 0.003, 3), _seeds(4.5, 0.003, 3)), 3, 3),
        INCONCLUSIVE: lambda: r.worse_by(None, 1, 1),
    },
    "lr_first_fewest": {
        HOLDS: lambda: r.every_arm(_verdicts(("a", HOLDS), ("b", HOLDS))),
        FAILS: lambda: r.every_arm(_verdicts(("a", HOLDS), ("b", FAILS))),
        INCONCLUSIVE: lambda: r.every_arm(_verdicts(("a", HOLDS), ("b", INCONCLUSIVE))),
    },
    "lr_top_two_most": {
        HOLDS: lambda: r.top_two_most(_layers(13.3, 79.3, 71.0, 73.0, 86.1, 95.6)),
        FAILS: lambda: r.top_two_most(_layers(13.3, 99.3, 71.0, 73.0, 86.1, 95.6)),
        INCONCLUSIVE: lambda: r.top_two_most(_layers(13.3, 79.3, 71.0, 86.0, 86.1, 95.6, se=0.3)),
    },
    "lr_use_falls": {
        HOLDS: lambda: r.order_with(
            {"all": [(1e-3, E(77.2)), (2e-3, E(72.2)), (3e-3, E(69.7)), (5e-3, E(69.9))]}, False
        ),
        FAILS: lambda: r.order_with({"all": [(1e-3, E(60)), (2e-3, E(65)), (3e-3, E(70))]}, False),
        INCONCLUSIVE: lambda: r.order_with(
            {"all": [(1e-3, E(70)), (2e-3, E(65)), (3e-3, E(72)), (5e-3, E(60))]}, False
        ),
    },
    "width_use_falls": {
        HOLDS: lambda: r.order_with({"t": [(1, E(9)), (2, E(7)), (4, E(5))]}, False),
        FAILS: lambda: r.order_with({"t": [(1, E(5)), (2, E(7)), (4, E(9))]}, False),
    },
    "depth_batch_use_rises": {
        HOLDS: lambda: r.order_with({"b": [(6, E(70)), (10, E(75)), (14, E(80))]}, True),
        FAILS: lambda: r.order_with({"b": [(6, E(80)), (10, E(75)), (14, E(70))]}, True),
        INCONCLUSIVE: lambda: r.order_with(
            {"b": [(6, E(70)), (10, E(75)), (14, E(72)), (18, E(73))]}, True
        ),
    },
    "width_depth_bottleneck": {
        HOLDS: lambda: _bottleneck(1e-3, 0.0, half=0.005),  # rises, then flat past 114
        FAILS: lambda: _bottleneck(-2e-4, -2e-4, half=0.005),  # falls throughout
        INCONCLUSIVE: lambda: _bottleneck(3e-4, 3e-4, half=0.005),  # a straight rise, no break
    },
    "sparsing_direction": {
        HOLDS: lambda: Verdict(r.direction(-0.01, 0.3, 0.2, "falls"), "x"),
        FAILS: lambda: Verdict(r.direction(0.01, 0.2, 0.3, "falls"), "x"),
        INCONCLUSIVE: lambda: Verdict(r.direction(-0.01, 0.2, 0.3, "falls"), "x"),
    },
}


def test_every_rule_has_cases_both_ways() -> None:
    assert set(CASES) == set(RULES)
    for key, cases in CASES.items():
        assert {HOLDS, FAILS} <= set(cases), key


@pytest.mark.parametrize(
    ("key", "outcome"), [(k, o) for k, cases in CASES.items() for o in cases]
)  # fmt: skip
def test_rule_decides(key: str, outcome: str) -> None:
    verdict = CASES[key][outcome]()
    assert verdict.outcome == outcome, f"{key}: {verdict}"
    if outcome == INCONCLUSIVE and key != "sparsing_direction":
        assert verdict.decide, f"{key}: an inconclusive verdict says what would decide it"


def test_rules_state_their_reason_and_threshold() -> None:
    for key, rule in RULES.items():
        assert rule.key == key and rule.claim and rule.source
        assert len(rule.statistic) > 20 and len(rule.threshold) > 20 and len(rule.reason) > 20
        assert "\n" not in rule.line


def test_docs_table_lists_every_rule() -> None:
    docs = Path(__file__).resolve().parents[1] / "docs" / "verdicts.md"
    if not docs.exists():
        pytest.skip("docs/ is not part of this installation")
    # The table in the docs is the registry's own rendering: they cannot drift apart.
    assert r.rules_markdown() in docs.read_text()


# --------------------------------------------------------------------------------------------------
# Missing data: n/a or inconclusive with a reason, never an exception


def test_missing_data_gives_na_or_inconclusive() -> None:
    assert r.layer_extreme({}, 0, True, "use").outcome == NA
    assert r.layer_order([(0, E(1.0))], True, "x").outcome == NA
    assert r.anticorrelation([1, 2, 3], [3, 2, 1]).outcome == NA  # three layers: no interval
    assert r.drop_order({0: 10, 1: 5, 2: 1}, 20, "x", measured=3).outcome == NA
    assert r.death_timing([], 0, 160, 100, 0).outcome == NA  # censored before the boundary
    assert r.death_timing([], 0, 160, 900, 7).outcome == FAILS  # nobody died
    one_seed = r.equivalence(welch([4.5], [4.4]), welch([0.2], [0.21]), 1, 1)
    assert one_seed.outcome == INCONCLUSIVE and "2 seeds" in one_seed.decide
    assert r.collapse(None, None, 1, 1).outcome == INCONCLUSIVE
    assert r.worse_by(None, 1, 1).outcome == INCONCLUSIVE
    assert r.per_layer_band({}, 5.0, "x").outcome == NA
    assert r.every_arm(_verdicts(("a", NA))).outcome == NA
    assert r.order_with({"a": [(1, E(1)), (2, E(2))]}, True).outcome == NA
    assert RULES["never_used"].no_data().outcome == NO_DATA
    assert r.bottleneck(None, 3).outcome == NA


def test_bottleneck_undecided_says_what_would_decide() -> None:
    wide = _bottleneck(1e-3, 0.0, half=0.2)  # rise then flat, limits known to ± 0.2 only
    assert wide.outcome == INCONCLUSIVE and "more arms" in wide.decide
    short = _bottleneck(1e-3, 0.0, half=0.005, arms=5)  # the arms stop at ratio 51
    assert short.outcome == INCONCLUSIVE and "past the bottleneck" in short.decide
    shown = _bottleneck(1e-3, 0.0, half=0.005)
    assert "bottleneck r* = 11" in shown.evidence and "1000 bootstrap draws" in shown.evidence


def test_inconclusive_equivalence_says_how_many_seeds() -> None:
    v = _mask_equivalence(spread=0.05, shift=0.0)
    n = seeds_for_equivalence(0.05, r.EQUIV_LOSS)
    assert f"loss: {n} seeds per arm" in v.decide and n > 5


# --------------------------------------------------------------------------------------------------
# The statistics against scipy and hand computations


def test_welch_equals_scipy() -> None:
    a, b = [4.51, 4.49, 4.55, 4.47], [4.60, 4.58, 4.66]
    d = welch(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert d.t == pytest.approx(ref.statistic) and d.p == pytest.approx(ref.pvalue)
    assert d.df == pytest.approx(ref.df)
    ci = ref.confidence_interval(0.95)
    assert (d.low, d.high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    ci90 = ref.confidence_interval(0.90)
    assert (d.low90, d.high90) == (pytest.approx(ci90.low), pytest.approx(ci90.high))
    assert welch([1.0], [1.0, 2.0]) is None


def test_tost_is_the_larger_one_sided_p() -> None:
    a, b = _seeds(4.50, 0.01), _seeds(4.505, 0.01)
    d = welch(a, b)
    margin = 0.02
    lower = stats.ttest_ind(a, [v - margin for v in b], equal_var=False, alternative="greater")
    upper = stats.ttest_ind(a, [v + margin for v in b], equal_var=False, alternative="less")
    assert tost_p(d, margin) == pytest.approx(max(lower.pvalue, upper.pvalue))
    # Equivalent at 0.05 exactly when the 90 % interval lies inside the margins.
    assert (tost_p(d, margin) < 0.05) == (-margin < d.low90 and d.high90 < margin)


def test_seeds_for_equivalence_by_simulation() -> None:
    """At the returned seed count a TOST with true difference 0 succeeds about 80 % of the
    time; one seed fewer, less often."""
    n = seeds_for_equivalence(sd=1.0, margin=1.5)
    gen = np.random.default_rng(0)

    def power(k: int) -> float:
        hits = 0
        for _ in range(4000):
            d = welch(gen.normal(0, 1, k), gen.normal(0, 1, k))
            hits += tost_p(d, 1.5) < 0.05
        return hits / 4000

    assert power(n) >= 0.75 and power(n - 1) < power(n)


def test_pearson_interval_is_fishers() -> None:
    c = pearson_ci([1, 2, 3, 4, 5], [2, 1, 4, 3, 6])
    r0 = np.corrcoef([1, 2, 3, 4, 5], [2, 1, 4, 3, 6])[0, 1]
    z, half = math.atanh(r0), 1.959964 / math.sqrt(2)
    assert c.r == pytest.approx(r0)
    assert (c.low, c.high) == (
        pytest.approx(math.tanh(z - half)),
        pytest.approx(math.tanh(z + half)),
    )


def test_rate_ratio_interval_by_hand() -> None:
    # 0 events in 100 steps, 10 in 100: given 10 events, all landed in period b; the exact
    # lower bound of pi is (alpha / 2) ** (1 / 10).
    rr = rate_ratio(0, 100, 10, 100)
    lo_pi = 0.025 ** (1 / 10)
    assert rr.ratio is None and rr.high == math.inf
    assert rr.low == pytest.approx(lo_pi / (1 - lo_pi))
    even = rate_ratio(50, 100, 50, 100)
    assert even.ratio == 1.0 and even.low < 1 < even.high
    assert rate_ratio(0, 100, 0, 100) is None


def test_order_score_and_ties() -> None:
    o = pairwise_order([E(1.0), E(2.0), E(3.0)], floor=0.1)
    assert (o.agree, o.against, o.ties, o.score) == (3, 0, 0, 1.0)
    o = pairwise_order([E(1.0), E(1.05), E(0.0)], floor=0.1)  # 1 vs 1.05: a tie
    assert (o.agree, o.against, o.ties) == (0, 2, 1)
    # A standard error widens the tie margin: 1.96 * sqrt(2) * 0.5 = 1.39.
    assert pairwise_order([E(1.0, 0.5), E(2.0, 0.5)], floor=0.1).ties == 1


def test_window_and_binomial_errors() -> None:
    e = window_estimate([1.0, 2.0, 3.0, float("nan")])
    assert (e.value, e.n) == (2.0, 3) and e.se == pytest.approx(1.0 / math.sqrt(3))
    assert binomial_se_pct(50.0, 100) == pytest.approx(5.0)


def test_paper_never_used_is_table2_arithmetic() -> None:
    table = paper.layer_table()
    for layer, (first, on, _off, _final) in paper.TABLE2.items():
        assert table.loc[layer, "never_used"] == pytest.approx(100 - first - on)
