"""Every decision rule of sparsetrace: the paper's claim, the statistic, the threshold and why.

One registry (:data:`RULES`) and one decision function per kind of claim. The run report, the
experiment reports and docs/verdicts.md all read from here, and the paper column applies the same
functions to the paper's published tables. A rule says ``holds`` / ``does not hold`` only when
its statistic clears the threshold beyond its uncertainty; otherwise ``inconclusive`` with what
would decide it, or ``n/a`` when the data is missing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from sparsetrace import paper
from sparsetrace.claims.stats import (
    LEVEL,
    Difference,
    Estimate,
    Z,
    extreme,
    negate,
    pairwise_order,
    pearson_ci,
    rate_ratio,
    seeds_for_equivalence,
    seeds_to_exclude,
    tie_margin,
    tost_p,
)
from sparsetrace.claims.verdict import FAILS, HOLDS, INCONCLUSIVE, NA, Rule, Verdict
from sparsetrace.sparsing.laws import Bottleneck

# ---------------------------------------------------------------------------------------------
# Thresholds. The reason for each is in its rule's text below and in docs/verdicts.md.

PRINT_PRECISION = 0.1  # percentage points: the paper prints its tables to 0.1 pp
END_WINDOW = 0.1  # end-of-training estimates: measurements in the last 10 % of the run...
END_MEASUREMENTS = 3  # ...and at least the last 3
# "(nearly) monotone": score = (for - against) / all pairs >= 0.6, i.e. without ties at least 80 %
# of the pairs in the claimed order
ORDER_SCORE = 0.6
DROP_FRACTION = 0.1  # a layer "drops" when its end value is at least 10 % below its first
ABOUT = 0.5  # "about X": within half of X either way
HIGH_LR_WARMUPS = 8000 / 5000  # the paper's high-LR phase: its first 8000 steps, warm-up 5000
DEATH_RATE_RATIO = 2.0  # "a dramatic increase": at least twice the rate after as during
DEAD_MIN_OFF = 0.1  # dead = unused from its last use to the end, for >= 10 % of the run
EQUIV_LOSS = 0.02  # nats: "no difference" in validation loss
EQUIV_ACC = 0.5  # accuracy points: "no difference" in next-token accuracy
COLLAPSE_LOSS = 0.1  # nats: a "performance collapse"
SUBSTANTIAL_LOSS = EQUIV_LOSS  # nats: "substantially worse" = worse beyond the equivalence margin
SIMILAR_POINTS = 10.0  # percentage points: "a similar per-layer fraction"
PRUNE_STEPS = 10  # pruned vs dead-masked: compared over the first steps after K...
PRUNE_TOLERANCE = 1e-4  # ...within this many nats
BOTTLENECK_ARMS = 4  # the two-segment line has 4 parameters (intercept, two slopes, r*)

_WINDOW = (
    f"end of training = mean ± standard error over the measurements in the last "
    f"{END_WINDOW:.0%} of the run (at least the last {END_MEASUREMENTS})"
)
_TIE = (
    f"two values tie when they differ by less than {Z:.2f} standard errors of the difference "
    f"or {PRINT_PRECISION} pp (the paper's print precision)"
)
_UNITS = "shares of units carry a binomial standard error, sqrt(p(1-p)/units)"
_ORDER = (
    f"score = (pairs in the claimed order - pairs against) / all pairs, ties counted as neither; "
    f"holds at score ≥ {ORDER_SCORE}, does not hold at score ≤ 0, inconclusive between"
)

_DROP_THRESHOLD = (
    f"holds if the last layer is strictly first and the order score over all layers is "
    f"≥ {ORDER_SCORE}; does not hold if another layer drops strictly earlier than the last one, "
    "the last one does not drop, or the score is ≤ 0; inconclusive otherwise (ties at the "
    "measuring resolution)"
)
_DROP_REASON = (
    "Steps are known to the measuring interval (trace.every): layers halfway at the same "
    "measured step are tied, not ordered. 'Nearly-monotonic' allows one pair in five against."
)


def _rule(key: str, claim: str, source: str, statistic: str, threshold: str, reason: str) -> Rule:
    return Rule(key, claim, source, statistic, threshold, reason)


RULES: dict[str, Rule] = {
    r.key: r
    for r in [
        _rule(
            "first_fewest_batch",
            "the first layer in the network (layer 0) consistently uses the fewest of its "
            "available hidden units in a batch (only about 13.3%)",
            "§3, Table 1",
            "per-batch use per layer at the end of training (% of the layer's units)",
            "holds if layer 0 is below every other layer beyond a tie; does not hold if any "
            "layer is below it beyond a tie; inconclusive on ties",
            f"{_WINDOW}; {_TIE}. Batch-to-batch noise alone must not decide an order.",
        ),
        _rule(
            "last_most_batch",
            "the final layer in the network (in this case layer 5) uses the most (95.6%)",
            "§3, Table 1",
            "per-batch use per layer at the end of training (%)",
            "holds if the last layer is above every other layer beyond a tie; does not hold if "
            "any layer is above it beyond a tie; inconclusive on ties",
            f"{_WINDOW}; {_TIE}.",
        ),
        _rule(
            "token_batch_anticorrelation",
            "there is a moderate (-0.15) negative correlation between token and batch hidden "
            "unit use",
            "§3",
            f"Pearson r across layers of end-of-training per-token and per-batch use, with its "
            f"{LEVEL:.0%} Fisher-z interval",
            "holds if the whole interval is below 0; does not hold if it is above 0; "
            "inconclusive if it contains 0",
            "A sign read off a handful of layers is not a correlation: with 6 layers the "
            "interval excludes 0 only for |r| > 0.81, so the claim is decidable only for strong "
            "correlations or deeper models. The paper's own Table 1 gives r = -0.05.",
        ),
        _rule(
            "first_batch_falls",
            "at initialization, higher layers of the network use monotonically fewer of their "
            "dimensions in the first training batch",
            "§3.1, Table 2",
            "use in the first measured batch per layer (%), pairwise order over layers",
            _ORDER,
            f"{_UNITS} (the seed-to-seed spread of randomly initialised units); {_TIE}. The "
            f"threshold {ORDER_SCORE} lets one pair in five disagree ('monotonically' as the "
            "paper's own rounded table allows).",
        ),
        _rule(
            "turned_on_rises",
            "The tendency for layers to 'turn on' hidden units is monotonic in the opposite "
            "direction, with higher layers turning on more hidden units",
            "§3.1, Table 2",
            "turned on per layer (% off in the first batch, on in the last), pairwise order",
            _ORDER,
            f"{_UNITS}; {_TIE}.",
        ),
        _rule(
            "first_turns_off_most",
            "Many hidden units are 'turned off' during training ... particularly in the first "
            "layer of the network",
            "§1, Table 2",
            "turned off per layer (% on in the first batch, off in the last)",
            "holds if layer 0 turns off more than every other layer beyond a tie; does not hold "
            "if another layer turns off more beyond a tie; inconclusive on ties",
            f"{_UNITS}; {_TIE}.",
        ),
        _rule(
            "per_token_drops_top_first",
            "both drop first in the final layer of the network, then the penultimate layer, and "
            "then the lower layers in nearly-monotonic succession from highest to lowest",
            "§3.2, Fig. 2a",
            "per layer, the first measured step at which per-token use is halfway from its "
            f"first value to its end value (a layer drops if its end value is ≥ "
            f"{DROP_FRACTION:.0%} below its first)",
            _DROP_THRESHOLD,
            _DROP_REASON,
        ),
        _rule(
            "p50_drops_top_first",
            "the median fraction of tokens within a sequence that use a hidden unit ... both "
            "drop first in the final layer",
            "§3.2, Fig. 2b",
            "per layer, the first measured step at which the rescaled 50th percentile (Table 3's "
            f"p50) is halfway from its first value to its end value (a layer drops if its end "
            f"value is ≥ {DROP_FRACTION:.0%} below its first)",
            _DROP_THRESHOLD,
            _DROP_REASON,
        ),
        _rule(
            "first_most_frequent",
            "hidden units in layer 0 are used much more frequently over a sequence: the 65th "
            "percentile hidden unit activates for at least 31% of tokens",
            "§4.3, Table 3",
            "rescaled 65th percentile per layer at the end of training (% of a sequence's tokens)",
            "holds if layer 0 is above every other layer beyond a tie; does not hold if any "
            "layer is above it beyond a tie; inconclusive on ties",
            f"The statistic the paper quotes; {_WINDOW}; {_TIE}.",
        ),
        _rule(
            "deaths_after_high_lr",
            "we see very few dimensions turned off for the first 8000 steps of training - which "
            "for this model encompasses the period of highest learning rate before cosine decay "
            "begins - and then a dramatic increase after that",
            "§4.2, Fig. 1",
            "permanent deaths (a unit dies at its last used step and stays unused in every "
            f"measured batch to the end, for at least {DEAD_MIN_OFF:.0%} of the run) per step "
            f"after the high-LR phase (the first {HIGH_LR_WARMUPS:g} warm-ups, the paper's "
            "8000 of 5000) over per step during it, all layers, with an exact interval",
            f"holds if the interval's lower bound is ≥ {DEATH_RATE_RATIO:g}; does not hold if "
            f"its upper bound is < {DEATH_RATE_RATIO:g} or no unit died; inconclusive between",
            "'A dramatic increase' is read as at least doubling. Units that switch off and come "
            "back (flicker) are not deaths; deaths in the last stretch of the run cannot be told "
            "from flickers and are left out (censored).",
        ),
        _rule(
            "never_used",
            "a small fraction - about 5% of the total hidden dimension of a layer - are at or "
            "below zero for every token at initialization and never turn on",
            "§1",
            "never used per layer = off in the first batch and never turned on, i.e. off in the "
            "first and in the last batch (Table 2's arithmetic: 100 - on at batch 0 - turned "
            "on), independent of how often the run measures",
            f"holds if every layer lies within {paper.NEVER_USED_PCT * (1 - ABOUT):g}-"
            f"{paper.NEVER_USED_PCT * (1 + ABOUT):g} %; does not hold if any layer's "
            f"{LEVEL:.0%} interval lies outside it; inconclusive otherwise",
            "A claim about each layer is checked on each layer. 'About 5 %' is read as within "
            "half of 5 % either way: apart from none (0 %) and from one in ten (10 %). The "
            "paper's own Table 2 gives 3.0 / 5.1 / 6.5 / 6.7 / 3.3 / 0.3 %.",
        ),
        _rule(
            "mask_dead_equivalent",
            "We observed no statistical difference in the accuracy achieved over the course of "
            "training between runs that did or did not have this masking applied",
            "§4.1.1",
            "final validation loss and next-token accuracy, dead-masked minus control, over "
            "seeds: Welch interval and two one-sided tests (TOST, alpha 0.05)",
            f"holds if both 90 % intervals lie within ±{EQUIV_LOSS} nats and ±{EQUIV_ACC} "
            f"accuracy points; does not hold if either {LEVEL:.0%} interval lies entirely "
            "outside its margin; inconclusive otherwise (with the seeds the margin needs)",
            f"'No significant difference' with few seeds is absence of evidence; equivalence "
            f"needs a margin. ±{EQUIV_LOSS} nats is 2 % perplexity and ±{EQUIV_ACC} points of "
            "accuracy, each several seed-to-seed standard deviations of the cpu-scale control "
            "(docs/verdicts.md) yet well below the effects of the paper's other interventions.",
        ),
        _rule(
            "mask_random_collapse",
            "we attempted to randomly select the same fraction of hidden units, and found "
            "performance collapse",
            "§4.1.1",
            "final validation loss, random-masked minus control and minus dead-masked, over "
            "seeds, with Welch intervals",
            f"holds if both lower bounds are ≥ {COLLAPSE_LOSS} nats; does not hold if the "
            f"random - control upper bound is < {COLLAPSE_LOSS} nats; inconclusive otherwise "
            "(one seed: always)",
            f"A collapse is an effect size, not a p-value: {COLLAPSE_LOSS} nats is +10.5 % "
            f"perplexity, five times the equivalence margin, and the random arm must also be "
            f"that much worse than the dead arm (the paper's contrast).",
        ),
        _rule(
            "mask_fraction_about_30",
            "the model had already turned off about 30% (calculated in aggregate over all "
            "layers) of its hidden units",
            "§4.1.1",
            "units masked by the dead mask, % of all units, mean over seeds",
            f"holds within {paper.PAPER_MASKED_PCT * (1 - ABOUT):g}-"
            f"{paper.PAPER_MASKED_PCT * (1 + ABOUT):g} %; "
            f"does not hold if the {LEVEL:.0%} interval lies outside; inconclusive otherwise",
            "'About 30 %' read as within half of 30 % either way, as for 'about 5 %'.",
        ),
        _rule(
            "mask_pruned_equal",
            "(beyond the paper) removing the dead units instead of masking them changes nothing",
            "§4.1.1 suggests it",
            f"largest |training-loss gap| to the dead-masked run over the first {PRUNE_STEPS} "
            "steps after K, over seeds",
            f"holds if ≤ {PRUNE_TOLERANCE:g} nats; does not hold otherwise",
            f"The two computations are equal in exact arithmetic; {PRUNE_TOLERANCE:g} nats bounds "
            "float rounding of other matrix shapes over a few steps (training amplifies it "
            "later).",
        ),
        _rule(
            "capacity_similar_fraction",
            "we see the model trained in Round 2 uses a similar per-layer fraction of its "
            "available capacity to what we saw in Round 1",
            "§4.4, Table 4",
            "per layer, round 2 minus round 1 per-batch use (% of the round's width), mean over "
            "seeds with its standard error",
            f"holds if every layer's |difference| + {Z:.2f} SE ≤ {SIMILAR_POINTS:g} pp; does not "
            f"hold if any layer's |difference| - {Z:.2f} SE > {SIMILAR_POINTS:g} pp; "
            "inconclusive otherwise",
            f"The paper's Table 4 calls differences of up to 4.7 pp similar while its layers "
            f"span 22-98 %; {SIMILAR_POINTS:g} pp is twice its largest 'similar' gap.",
        ),
        _rule(
            "capacity_round2_worse",
            "the model at round 2 has substantially worse performance",
            "§4.4",
            "final validation loss, round 2 minus round 1, over seeds, Welch interval",
            f"holds if the lower bound is ≥ {SUBSTANTIAL_LOSS} nats; does not hold if the upper "
            f"bound is < {SUBSTANTIAL_LOSS} nats; inconclusive otherwise (one seed: always)",
            "'Substantially' = worse by more than the margin within which two arms count as "
            "equivalent; any increase is not 'substantially worse'.",
        ),
        _rule(
            "lr_first_fewest",
            "in all cases layer 0 [uses] substantially fewer dimensions over the course of a "
            "batch compared to any other layer",
            "§5.1, Table 5",
            "per arm: the first-layer rule (F1) on the arm's per-batch use",
            "holds if it holds in every arm; does not hold if it fails in any; inconclusive "
            "otherwise",
            "'In all cases' = in every arm.",
        ),
        _rule(
            "lr_top_two_most",
            "the two highest layers of the network still use the most dimensions",
            "§5.1, Table 5",
            "per arm: each of the two top layers above every lower layer beyond a tie",
            "holds if so in every arm; does not hold if a lower layer is above either of them "
            "beyond a tie in any arm; inconclusive otherwise",
            f"{_WINDOW}; {_TIE}.",
        ),
        _rule(
            "lr_use_falls",
            "aggregate sparsity levels, and particularly the extreme batch-level sparsity in "
            "layer 0, goes down as peak learning rate decreases",
            "§5.1, Table 5",
            "per-batch use over all layers (unit-weighted) and of layer 0, pairwise order over "
            "the arms' learning rates (use should fall as the LR rises)",
            f"holds if both orders score ≥ {ORDER_SCORE}; does not hold if either scores ≤ 0; "
            "inconclusive otherwise",
            f"{_ORDER}; {_TIE}.",
        ),
        _rule(
            "width_use_falls",
            "wider models had generally higher levels of sparsity ... both for hidden units used "
            "per token ... and for hidden units used per batch",
            "§5.2, Fig. 3",
            "per-token and per-batch use over all layers (unit-weighted) at the end of training, "
            "pairwise order over the arms' d_ff (use should fall as d_ff rises)",
            f"holds if both orders score ≥ {ORDER_SCORE}; does not hold if either scores ≤ 0; "
            "inconclusive otherwise",
            f"{_ORDER}; {_TIE}.",
        ),
        _rule(
            "depth_batch_use_rises",
            "hidden units per batch tend to increase in a deeper model",
            "§5.3, Fig. 4",
            "per-batch use over all layers (unit-weighted) at the end of training, pairwise order "
            "over the arms' depths",
            f"holds at score ≥ {ORDER_SCORE}; does not hold at score ≤ 0; inconclusive between",
            f"{_ORDER}; {_TIE}.",
        ),
        _rule(
            "sparsing_direction",
            "the activation ratio of ReLU-activated LLMs decreases with training data, while "
            "that of SiLU-activated LLMs increases (Sparsing Law, Luo et al.)",
            "Sparsing Law §4.2",
            "per run, the least-squares slope of the PPL-p% activation ratio against ln(tokens) "
            "and the mean of the last half of the checkpoints against the first half",
            "holds if slope and halves both move the expected way (relu falls, silu rises) in "
            "every run; does not hold if both move the other way in any run; inconclusive "
            "otherwise",
            "Two independent summaries of one curve must agree before a direction is claimed.",
        ),
        _rule(
            "width_depth_bottleneck",
            "the activation ratio linearly increases with the width-depth ratio below a certain "
            "bottleneck point (Sparsing Law, Luo et al.)",
            "Sparsing Law, abstract (width-depth experiment)",
            "across arms of one non-embedding parameter budget, each arm's limit A0 (its Sparsing "
            "Law fitted over its checkpoints) against its width-depth ratio r = d_model / "
            "n_layers: the continuous two-segment line a + b1·min(r, r*) + b2·max(r − r*, 0), r* "
            "by least squares on a grid between the arms' ratios (at least 2 arms at or below "
            "r*, 1 above), and one straight line through all arms; 95 % intervals from a "
            "parametric bootstrap (1000 draws, fixed seed) of each arm's A0 within its interval",
            "holds if b1 > 0 beyond its interval and b2 − b1 < 0 beyond its interval; does not "
            "hold if b1 or the straight line's slope is < 0 beyond its interval; inconclusive "
            f"otherwise; n/a with fewer than {BOTTLENECK_ARMS} arms with a fitted limit",
            "The claim has two parts, a rise and its end, and each must clear its own "
            "uncertainty. 'Stops' is read as 'rises less than before' (b2 < b1): a slope of "
            "exactly 0 cannot be shown by any finite interval. Four parameters need at least "
            "four arms. The bootstrap carries each arm's fit uncertainty (its A0 interval), not "
            "the seed-to-seed spread of shapes: with one seed per shape, a decided verdict still "
            "rests on one training run per point.",
        ),
    ]
}


# ---------------------------------------------------------------------------------------------
# Decision functions. ``floor`` is the smallest difference that can be told from a tie.


def _pct(v: float) -> str:
    """A percentage as the paper prints it: one decimal, two significant digits below 1 %."""
    return f"{v:.2g}" if 0 < abs(v) < 1 else f"{v:.1f}"


def _fmt(e: Estimate) -> str:
    return f"{_pct(e.value)} ± {e.se:.2g} %" if e.se > 0 else f"{_pct(e.value)} %"


def _finite(values: Mapping[int, Estimate]) -> dict[int, Estimate]:
    return {k: v for k, v in values.items() if not math.isnan(v.value)}


def layer_extreme(
    values: Mapping[int, Estimate], target: int, highest: bool, what: str,
    floor: float = PRINT_PRECISION,
) -> Verdict:  # fmt: skip
    """Is layer ``target`` the highest (lowest) of ``values`` beyond ties?"""
    values = _finite(values)
    if target not in values or len(values) < 2:
        return Verdict(NA, f"needs {what} of layer {target} and at least one other layer")
    signed = values if highest else dict(zip(values, negate(list(values.values())), strict=True))
    ex = extreme(signed, target, floor)
    word = "above" if highest else "below"
    others = {k: v for k, v in values.items() if k != target}
    nearest = max(others, key=lambda k: others[k].value if highest else -others[k].value)
    evidence = (
        f"layer {target}: {_fmt(values[target])}; nearest: layer {nearest} "
        f"{_fmt(values[nearest])} (tie margin "
        f"{tie_margin(values[target], values[nearest], floor):.2g} pp)"
    )
    if ex.loses:
        beyond = ", ".join(f"layer {k} {_fmt(values[k])}" for k in ex.loses)
        return Verdict(FAILS, f"{evidence}; {word} it: {beyond}")
    if ex.ties:
        tied = ", ".join(f"layer {k}" for k in ex.ties)
        return Verdict(INCONCLUSIVE, f"{evidence}; tied with {tied}",
                       "more measurements at the end of training, or a longer run")  # fmt: skip
    return Verdict(HOLDS, evidence)


def layer_order(
    values: Sequence[tuple[int, Estimate]], rising: bool, what: str, floor: float = PRINT_PRECISION
) -> Verdict:
    """Do ``values`` (layer, estimate) rise (fall) with depth, pair by pair?"""
    values = [(k, v) for k, v in sorted(values) if not math.isnan(v.value)]
    if len(values) < 3:
        return Verdict(NA, f"needs {what} of at least three layers")
    ests = [v for _, v in values]
    order = pairwise_order(ests if rising else negate(ests), floor)
    chain = " → ".join(_pct(v.value) for v in ests)
    evidence = f"{chain} % (layers {values[0][0]}–{values[-1][0]}): {order}"
    return _order_verdict(order.score, evidence, "more seeds (a smaller standard error)")


def _order_verdict(score: float, evidence: str, decide: str) -> Verdict:
    if score >= ORDER_SCORE:
        return Verdict(HOLDS, evidence)
    if score <= 0:
        return Verdict(FAILS, evidence)
    return Verdict(INCONCLUSIVE, evidence, decide)


def anticorrelation(token: Sequence[float], batch: Sequence[float]) -> Verdict:
    """Per-token vs per-batch use across layers: is r < 0 beyond its interval?"""
    c = pearson_ci(token, batch)
    if c is None:
        return Verdict(NA, "needs per-token and per-batch use of at least four layers that vary")
    if c.high < 0:
        return Verdict(HOLDS, str(c))
    if c.low > 0:
        return Verdict(FAILS, str(c))
    needed = math.tanh(Z / math.sqrt(c.n - 3))
    decide = f"with {c.n} layers only |r| > {needed:.2f} excludes 0: more layers"
    return Verdict(INCONCLUSIVE, str(c), decide)


def drop_order(
    halfway: Mapping[int, int | None], resolution: int | None, what: str, measured: int
) -> Verdict:
    """Does ``what`` drop first in the top layer, then downwards? ``halfway``: per layer the
    step at which it is halfway down (None: it does not drop); ``resolution``: the measuring
    interval in steps; ``measured``: how many steps were measured."""
    if measured < END_MEASUREMENTS + 2 or len(halfway) < 3:
        return Verdict(NA, f"needs {what} of at least three layers at {END_MEASUREMENTS + 2} or "
                       f"more measured steps (got {len(halfway)} layers, {measured} steps)",
                       "measure more often (trace.every)")  # fmt: skip
    layers = sorted(halfway)
    top = layers[-1]
    latest = max((s for s in halfway.values() if s is not None), default=0) + 1
    # No drop = later than any drop; the claim: higher layers drop earlier (steps fall).
    steps = {k: Estimate(float(latest if halfway[k] is None else halfway[k])) for k in layers}
    order = pairwise_order(negate([steps[k] for k in layers]), floor=0.5)
    first = extreme(dict(zip(layers, negate([steps[k] for k in layers]), strict=True)), top, 0.5)
    listed = ", ".join(
        f"L{k} @{halfway[k]}" if halfway[k] is not None else f"L{k} no drop"
        for k in sorted(layers, key=lambda k: (steps[k].value, -k))
    )
    step_text = f"every {resolution} steps" if resolution else "at irregular steps"
    evidence = f"halfway-drop steps: {listed} (measured {step_text}); {order}"
    if halfway[top] is None or first.loses or order.score <= 0:
        return Verdict(FAILS, evidence)
    if not first.ties and order.score >= ORDER_SCORE:
        return Verdict(HOLDS, evidence)
    return Verdict(INCONCLUSIVE, evidence,
                   "measure more often (ties at the measured steps)" if first.ties
                   else "a clearer order: more seeds or a longer run")  # fmt: skip


def per_layer_band(values: Mapping[int | str, Estimate], center: float, what: str) -> Verdict:
    """Does every layer lie within ABOUT of ``center`` (its interval for 'does not hold')?"""
    values = {k: v for k, v in values.items() if not math.isnan(v.value)}
    if not values:
        return Verdict(NA, f"needs {what}")
    lo, hi = center * (1 - ABOUT), center * (1 + ABOUT)
    inside = [k for k, v in values.items() if lo <= v.value <= hi]
    outside = [k for k, v in values.items() if v.value + Z * v.se < lo or v.value - Z * v.se > hi]
    listed = ", ".join(f"{k}: {_fmt(v)}" for k, v in values.items())
    evidence = f"{listed} (band {lo:g}–{hi:g} %)"
    if outside:
        return Verdict(FAILS, f"{evidence}; outside: {', '.join(map(str, outside))}")
    if len(inside) == len(values):
        return Verdict(HOLDS, evidence)
    return Verdict(INCONCLUSIVE, evidence, "more seeds (a narrower interval)")


def death_timing(
    deaths: Sequence[int], first: int, boundary: float, eligible_end: int, flickers: int
) -> Verdict:
    """Permanent deaths per step after the high-LR phase vs during it.

    ``deaths``: the last-used step of every permanently dead unit (all layers) up to
    ``eligible_end`` (later ones are censored); ``first``: the first measured step; ``boundary``:
    the end of the high-LR phase; ``flickers``: switch-offs that were undone later.
    """
    if boundary <= first or eligible_end <= boundary:
        return Verdict(NA, f"the measured, uncensored span (steps {first}–{eligible_end}) does not "
                       f"reach past the end of the high-LR phase (step {boundary:g})",
                       "a longer run, measured past the high-LR phase")  # fmt: skip
    during = sum(1 for s in deaths if s <= boundary)
    after = sum(1 for s in deaths if boundary < s <= eligible_end)
    span_during, span_after = boundary - first, eligible_end - boundary
    head = (
        f"{during} permanent deaths in steps {first}–{boundary:g} (high LR), {after} in "
        f"{boundary:g}–{eligible_end} ({flickers} switch-offs undone later are not counted)"
    )
    rr = rate_ratio(during, span_during, after, span_after)
    if rr is None:
        return Verdict(FAILS, f"{head}: no unit died permanently")
    point = "∞ (none during)" if rr.ratio is None else f"{rr.ratio:.2f}"
    interval = f"{LEVEL:.0%} CI [{rr.low:.2f}, {rr.high:.3g}]"
    evidence = f"{head}; rate after / during = {point}, {interval}"
    if rr.low >= DEATH_RATE_RATIO:
        return Verdict(HOLDS, evidence)
    if rr.high < DEATH_RATE_RATIO:
        return Verdict(FAILS, evidence)
    return Verdict(INCONCLUSIVE, evidence, "more deaths to count: a longer or wider run")


def _no_interval(n_a: int, n_b: int) -> str:
    return f"{n_a} and {n_b} seed(s): no interval (needs at least 2 seeds per arm)"


def equivalence(loss: Difference | None, acc: Difference | None, n_a: int, n_b: int) -> Verdict:
    """TOST of final loss (nats) and accuracy (fraction) within EQUIV_LOSS / EQUIV_ACC."""
    if loss is None or acc is None:
        return Verdict(INCONCLUSIVE, _no_interval(n_a, n_b), "at least 2 seeds per arm")
    margins = {"loss": (loss, EQUIV_LOSS, 1.0, "nats"), "accuracy": (acc, EQUIV_ACC, 100.0, "pts")}
    parts, equivalent, different, needs = [], True, False, []
    for name, (d, margin, scale, unit) in margins.items():
        lo90, hi90 = scale * d.low90, scale * d.high90
        equivalent &= -margin < lo90 and hi90 < margin
        different |= scale * d.low > margin or scale * d.high < -margin
        parts.append(
            f"{name} {scale * d.diff:+.3g} {unit}, 90 % CI [{lo90:+.3g}, {hi90:+.3g}], "
            f"TOST p = {tost_p(d, margin / scale):.3g} (margin ±{margin:g})"
        )
        n = seeds_for_equivalence(scale * d.pooled_sd, margin)
        needs.append(f"{name}: {n if n else 'over 10,000'} seeds per arm at the observed "
                     f"spread (sd {scale * d.pooled_sd:.2g} {unit})")  # fmt: skip
    evidence = f"{'; '.join(parts)}; {loss.n_a} vs {loss.n_b} seeds"
    if different:
        return Verdict(FAILS, evidence)
    if equivalent:
        return Verdict(HOLDS, evidence)
    return Verdict(INCONCLUSIVE, evidence, "; ".join(needs))


def at_least(d: Difference, threshold: float, what: str, unit: str = "nats") -> tuple[str, str]:
    """(outcome, evidence) of 'the difference is at least ``threshold``' from Welch's interval."""
    text = f"{what} {d.diff:+.4g} {unit}, {d.ci()}"
    if d.low >= threshold:
        return HOLDS, text
    if d.high < threshold:
        return FAILS, text
    return INCONCLUSIVE, text


def collapse(
    vs_control: Difference | None, vs_dead: Difference | None, n_random: int, n_control: int
) -> Verdict:
    """Random-masked arm's final loss at least COLLAPSE_LOSS worse than control and than dead."""
    if vs_control is None:
        return Verdict(INCONCLUSIVE, _no_interval(n_random, n_control), "at least 2 seeds per arm")
    c_out, c_text = at_least(vs_control, COLLAPSE_LOSS, "random − control")
    d_out, d_text = (
        (INCONCLUSIVE, "random − dead: no dead arm with 2 seeds")
        if vs_dead is None
        else at_least(vs_dead, COLLAPSE_LOSS, "random − dead")
    )
    evidence = f"{c_text}; {d_text}"
    if c_out == FAILS:
        return Verdict(FAILS, evidence)
    if c_out == HOLDS and d_out == HOLDS:
        return Verdict(HOLDS, evidence)
    if c_out == HOLDS and d_out == FAILS:
        return Verdict(FAILS, f"{evidence} (the dead arm is nearly as bad)")
    n = seeds_to_exclude(vs_control.pooled_sd, vs_control.diff, COLLAPSE_LOSS)
    return Verdict(
        INCONCLUSIVE,
        evidence,
        f"about {n} seeds per arm at the observed spread" if n else "more seeds",
    )


def worse_by(d: Difference | None, n_a: int, n_b: int) -> Verdict:
    """Round 2's final loss at least SUBSTANTIAL_LOSS worse than round 1's."""
    if d is None:
        return Verdict(INCONCLUSIVE, _no_interval(n_a, n_b), "at least 2 seeds per round")
    out, text = at_least(d, SUBSTANTIAL_LOSS, "round 2 − round 1 loss")
    if out != INCONCLUSIVE:
        return Verdict(out, text)
    n = seeds_to_exclude(d.pooled_sd, d.diff, SUBSTANTIAL_LOSS)
    return Verdict(INCONCLUSIVE, text, f"about {n} seeds per round" if n else "more seeds")


def pruned_equal(first_gap: float, later: str) -> Verdict:
    """The pruned run follows the dead-masked one: largest early loss gap within tolerance."""
    evidence = (
        f"largest gap over the first {PRUNE_STEPS} steps after K: {first_gap:.2g} nats; {later}"
    )
    if math.isnan(first_gap):
        return Verdict(NA, "no pruned run")
    return Verdict(HOLDS if first_gap <= PRUNE_TOLERANCE else FAILS, evidence)


def similar_fractions(diffs: Mapping[int, Estimate]) -> Verdict:
    """Per layer, is |round 2 - round 1| use within SIMILAR_POINTS beyond its uncertainty?"""
    diffs = {k: v for k, v in diffs.items() if not math.isnan(v.value)}
    if not diffs:
        return Verdict(NA, "needs per-batch use of both rounds")
    within = [k for k, v in diffs.items() if abs(v.value) + Z * v.se <= SIMILAR_POINTS]
    beyond = [k for k, v in diffs.items() if abs(v.value) - Z * v.se > SIMILAR_POINTS]
    listed = ", ".join(f"L{k} {v.value:+.1f}" + (f" ± {v.se:.1f}" if v.se else "")
                       for k, v in sorted(diffs.items()))  # fmt: skip
    evidence = f"round 2 − round 1 (pp): {listed}"
    if beyond:
        return Verdict(FAILS, f"{evidence}; beyond {SIMILAR_POINTS:g} pp: layers "
                       f"{', '.join(map(str, beyond))}")  # fmt: skip
    if len(within) == len(diffs):
        return Verdict(HOLDS, evidence)
    return Verdict(INCONCLUSIVE, evidence, "more seeds per round")


def every_arm(verdicts: Mapping[str, Verdict]) -> Verdict:
    """A claim made 'in all cases': holds in every arm, fails in any, else inconclusive."""
    decided = {k: v for k, v in verdicts.items() if v.outcome != NA}
    if not decided:
        return Verdict(NA, "no arm could be checked")
    evidence = "; ".join(f"{k}: {v.outcome} ({v.evidence})" for k, v in verdicts.items())
    if any(v.outcome == FAILS for v in decided.values()):
        return Verdict(FAILS, evidence)
    if len(decided) == len(verdicts) and all(v.outcome == HOLDS for v in decided.values()):
        return Verdict(HOLDS, evidence)
    return Verdict(INCONCLUSIVE, evidence, "the undecided arms (see their verdicts)")


def top_two_most(values: Mapping[int, Estimate], floor: float = PRINT_PRECISION) -> Verdict:
    """Are the two top layers each above every lower layer beyond a tie?"""
    values = _finite(values)
    if len(values) < 3:
        return Verdict(NA, "needs per-batch use of at least three layers")
    layers = sorted(values)
    top, lower = layers[-2:], layers[:-2]
    losses, ties = [], []
    for t in top:
        sub = {k: values[k] for k in [t, *lower]}
        ex = extreme(sub, t, floor)
        losses += [f"layer {k} > layer {t}" for k in ex.loses]
        ties += [f"layer {k} ≈ layer {t}" for k in ex.ties]
    lowest_top = min(values[t].value for t in top)
    highest_lower = max(values[k].value for k in lower)
    evidence = f"top two ≥ {lowest_top:.1f} %, others ≤ {highest_lower:.1f} %"
    if losses:
        return Verdict(FAILS, f"{evidence}; {', '.join(losses)}")
    if ties:
        return Verdict(INCONCLUSIVE, f"{evidence}; {', '.join(ties)}",
                       "more measurements at the end of training")  # fmt: skip
    return Verdict(HOLDS, evidence)


def order_with(
    series: Mapping[str, Sequence[tuple[float, Estimate]]], rising: bool,
    floor: float = PRINT_PRECISION,
) -> Verdict:  # fmt: skip
    """Does each named quantity rise (fall) as the swept value rises? ``series``: name ->
    (swept value, estimate) pairs; every order must score ≥ ORDER_SCORE to hold."""
    if not series or any(len(points) < 3 for points in series.values()):
        return Verdict(NA, "needs at least three arms", "a sweep of three or more values")
    scores, parts = [], []
    for name, points in series.items():
        ests = [e for _, e in sorted(points, key=lambda p: p[0])]
        order = pairwise_order(ests if rising else negate(ests), floor)
        chain = " → ".join(_pct(e.value) for e in ests)
        parts.append(f"{name}: {chain} % as the swept value rises, {order}")
        scores.append(order.score)
    evidence = "; ".join(parts)
    return _order_verdict(min(scores), evidence, "more arms or seeds")


def direction(slope: float, first: float, last: float, expected: str) -> str:
    """'holds' / 'does not hold' / 'inconclusive' for one curve expected to 'fall' or 'rise'."""
    sign = -1 if expected == "falls" else 1
    if sign * slope > 0 and sign * (last - first) > 0:
        return HOLDS
    if sign * slope < 0 and sign * (last - first) < 0:
        return FAILS
    return INCONCLUSIVE


def bottleneck(fit: Bottleneck | None, arms: int) -> Verdict:
    """Does the limit A0 rise with the width-depth ratio up to r* and rise less beyond it?
    ``fit``: the two-segment line through the ``arms`` arms that have a fitted limit and its
    interval (None when there are too few)."""
    if fit is None or arms < BOTTLENECK_ARMS:
        return Verdict(NA, f"{arms} arm(s) with a fitted limit A0; the two-segment line needs at "
                       f"least {BOTTLENECK_ARMS}",
                       "more arms (--ratios), each with at least 5 checkpoints")  # fmt: skip
    iv = fit.intervals

    def slope(name: str, value: float) -> str:
        return f"{name} {value:+.3g} [{iv[name][0]:+.3g}, {iv[name][1]:+.3g}]"

    evidence = (
        f"bottleneck r* = {fit.r_star:.4g} [{iv['r_star'][0]:.4g}, {iv['r_star'][1]:.4g}]; "
        f"slopes of A0 per unit of ratio: {slope('below', fit.below)}, "
        f"{slope('above', fit.above)}, {slope('difference', fit.above - fit.below)} (above − "
        f"below), {slope('linear', fit.linear)} (one straight line); {LEVEL:.0%} intervals "
        f"over {fit.draws} bootstrap draws of the {arms} arms' limits"
    )
    if iv["below"][1] < 0 or iv["linear"][1] < 0:
        return Verdict(FAILS, evidence)
    if iv["below"][0] > 0 and iv["difference"][1] < 0:
        return Verdict(HOLDS, evidence)
    if iv["below"][0] > 0 or iv["linear"][0] > 0:  # a rise is shown, its end is not
        decide = "arms past the bottleneck (larger --ratios), or narrower limits (more checkpoints)"
    else:
        decide = "more arms, or narrower limits (more checkpoints or seeds)"
    return Verdict(INCONCLUSIVE, evidence, decide)


def rules_markdown() -> str:
    """Every rule as one Markdown table (docs/verdicts.md embeds it; a test keeps them equal)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [
        "| rule | the paper's claim | where | statistic | threshold | why this threshold |",
        "|---|---|---|---|---|---|",
    ]
    for rule in RULES.values():
        cells = [f"`{rule.key}`", f"“{rule.claim}”", rule.source, rule.statistic,
                 rule.threshold, rule.reason]  # fmt: skip
        lines.append("| " + " | ".join(cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"
