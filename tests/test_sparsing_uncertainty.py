"""The activation ratio's uncertainty with the search for c included (sparsing/uncertainty.py).

Checked against: a hand-computed crossing; a case whose resampled c has a closed form; and a
simulation in which many independent evaluation sets give the true sampling spread, which the
bootstrap of one set must estimate (and the fixed-c SE must miss).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sparsetrace.model.transformer import ModelConfig, Transformer
from sparsetrace.sites import MlpSites
from sparsetrace.sparsing.search import Subject, TokenBatch, causal_lm_loss
from sparsetrace.sparsing.uncertainty import (
    SequenceStats,
    cross,
    ratio_se,
    resample_weights,
    search_bootstrap,
)


def test_crossing_is_linear_between_the_evaluated_c_and_clipped_outside() -> None:
    cs = np.array([0.0, 0.1, 0.2])
    ppl = np.array([[1.0, 1.005, 1.02], [1.0, 1.011, 1.03], [1.0, 1.001, 1.002], [1.02] * 3])
    ratio = np.array([[0.5, 0.3, 0.2]] * 4)
    out = cross(cs, ppl, ratio, target=1.01)
    # row 0: 1.01 lies a third of the way from 1.005 to 1.02, between c = 0.1 and 0.2
    assert out.c[0] == pytest.approx(0.1 + 0.1 / 3) and out.ratio[0] == pytest.approx(0.3 - 0.1 / 3)
    # row 1: between 1.0 and 1.011 at c = 0 and 0.1: 10/11 of the way
    assert out.c[1] == pytest.approx(0.1 * 10 / 11) and out.ratio[1] == pytest.approx(
        0.5 - 0.2 * 10 / 11
    )
    # row 2 never reaches the target: clipped to the last c
    assert out.c[2] == 0.2 and out.ratio[2] == 0.2
    # row 3 is past the target at the first c: clipped to it
    assert out.c[3] == 0.0 and out.ratio[3] == 0.5
    assert out.clipped == 0.5


def _linear_world(k: np.ndarray, cs: np.ndarray, r0: float, slope: float):
    """Sequences of 10 targets whose mean loss rises by k_i per unit of c, and whose activation
    ratio falls as r0 - slope * c for every sequence: a resample's own c is ln(T) / mean(k)."""
    n = len(k)
    targets = np.full(n, 10.0)
    dense_loss = np.full(n, 30.0)

    def at(c: float) -> SequenceStats:
        active = np.full((1, n), (r0 - slope * c) * 10 * 4)  # 10 tokens x 4 units
        return SequenceStats(dense_loss + 10 * k * c, targets, active, np.full((1, n), 10.0),
                             np.array([4.0]))  # fmt: skip

    return at(0.0), {float(c): at(float(c)) for c in cs}


def test_resampled_c_follows_the_closed_form() -> None:
    rng = np.random.default_rng(1)
    k = rng.gamma(4.0, 0.05, size=40)  # mean 0.2: c* = ln(1.01) / 0.2 ~ 0.05
    cs = np.linspace(0.001, 0.2, 400)
    dense, probes = _linear_world(k, cs, r0=0.3, slope=2.0)
    (boot,) = search_bootstrap([dense], [probes], target=1.01)
    w = resample_weights(len(k))
    c_exact = math.log(1.01) / ((w @ k) / w.sum(1))
    assert np.allclose(boot.c, c_exact, rtol=2e-3)
    assert boot.se == pytest.approx((0.3 - 2.0 * c_exact).std(ddof=1), rel=1e-2)
    # every sequence has the same ratio at a given c: the fixed-c SE sees nothing
    assert ratio_se(probes[float(cs[50])]) == pytest.approx(0.0, abs=1e-12)
    assert boot.se > 0


def test_several_models_share_one_resampled_c_from_their_mean_ppl_ratio() -> None:
    # two models on the same 30 sequences; the search averages their PPL ratios (as find_cett)
    rng = np.random.default_rng(3)
    k1, k2 = rng.gamma(4.0, 0.05, size=30), rng.gamma(4.0, 0.1, size=30)
    cs = np.linspace(0.001, 0.2, 800)
    (d1, p1), (d2, p2) = _linear_world(k1, cs, 0.3, 2.0), _linear_world(k2, cs, 0.2, 1.0)
    b1, b2 = search_bootstrap([d1, d2], [p1, p2], target=1.01)
    assert np.array_equal(b1.c, b2.c)
    w = resample_weights(30)
    m1, m2 = (w @ k1) / w.sum(1), (w @ k2) / w.sum(1)
    for row in (0, 1, 500):  # mean(exp(m1 c), exp(m2 c)) = 1.01, solved by bisection here
        lo, hi = 0.0, 0.2
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (
                (mid, hi)
                if (math.exp(m1[row] * mid) + math.exp(m2[row] * mid)) / 2 < 1.01
                else (lo, mid)
            )
        assert b1.c[row] == pytest.approx(lo, rel=1e-3)
        assert b2.ratio[row] == pytest.approx(0.2 - 1.0 * lo, rel=1e-3)
    with pytest.raises(ValueError, match="no c > 0"):
        search_bootstrap([d1, d2], [p1, {}], target=1.01)
    one = SequenceStats(*(a[:1] for a in (d1.loss, d1.targets)), d1.active[:, :1],
                        d1.tokens[:, :1], d1.widths)  # fmt: skip
    probes = {c: SequenceStats(v.loss[:1], v.targets[:1], v.active[:, :1], v.tokens[:, :1],
                               v.widths) for c, v in p1.items()}  # fmt: skip
    assert math.isnan(search_bootstrap([one], [probes], target=1.01)[0].se)  # nothing to resample


def test_bootstrap_estimates_the_spread_over_independent_evaluation_sets() -> None:
    """The estimate repeated on 300 independent sets of 32 sequences: its SD is the truth that one
    set's bootstrap SE must estimate (within 25 %, on average over 40 sets)."""
    rng = np.random.default_rng(7)
    cs = np.linspace(0.002, 0.3, 150)
    r0, slope, n = 0.3, 2.0, 32

    def draw() -> np.ndarray:
        return rng.gamma(2.0, 0.1, size=n)  # heavy-ish spread of per-sequence loss slopes

    truth = np.std([r0 - slope * math.log(1.01) / draw().mean() for _ in range(300)], ddof=1)
    ses = []
    for _ in range(40):
        dense, probes = _linear_world(draw(), cs, r0, slope)
        ses.append(search_bootstrap([dense], [probes], target=1.01)[0].se)
    assert np.mean(ses) == pytest.approx(truth, rel=0.25)


def _tiny_subject(seed: int = 0):
    cfg = ModelConfig(n_layers=2, d_model=16, n_heads=2, d_ff=64, vocab_size=40, seq_len=16)
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    data = torch.randint(0, 40, (24, 17), generator=torch.Generator().manual_seed(seed))
    batches = [TokenBatch(data[i : i + 8, :-1], data[i : i + 8, 1:]) for i in range(0, 24, 8)]
    return model, batches, Subject(model, batches)


def test_per_sequence_losses_pool_to_the_models_own_loss() -> None:
    model, batches, subject = _tiny_subject()
    dense = subject.reference.dense
    with torch.no_grad():
        direct = np.mean([float(model(b.inputs, b.targets).loss) for b in batches])
    assert dense.loss == pytest.approx(direct, rel=1e-6)
    assert dense.sequences.n == 24 and (dense.sequences.targets == 16).all()
    assert dense.sequences.active.shape == (2, 24)
    # a valid mask: each sequence sums its valid targets' losses only, and counts them
    valid = torch.arange(16).expand(8, 16) < torch.arange(1, 9)[:, None] * 2  # 2, 4, ..., 16
    masked = TokenBatch(batches[0].inputs, batches[0].targets, valid)
    with torch.no_grad():
        logits = model(masked.inputs).logits
        per_token = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), masked.targets, reduction="none"
        )
        expected = [float(per_token[i, : 2 * (i + 1)].sum()) for i in range(8)]
        assert causal_lm_loss(model, masked).tolist() == pytest.approx(expected, rel=1e-5)
    ev = Subject(model, [masked]).run()
    assert ev.sequences.targets.tolist() == [2, 4, 6, 8, 10, 12, 14, 16]
    assert ev.loss == pytest.approx(sum(expected) / 72, rel=1e-5)


def test_report_sentence_names_both_standard_errors() -> None:
    from sparsetrace.report.sparsing import uncertainty_text

    final = {"activation_ratio": 0.1, "activation_ratio_se": 0.001}
    old = uncertainty_text({"search": {}}, final)  # a file from before the search SE
    assert "± 0.10 (" in old and "1.0% relative" in old and "varies more" in old
    summary = {"search": {"c_interval_95": [0.02, 0.05], "clipped": 0.1}}
    new = uncertainty_text(summary, {**final, "activation_ratio_se_search": 0.003})
    assert "± 0.30 (3.0% relative; c 95 % interval 0.02-0.05; 10.0% of resamples outside" in new
    # a checkpoint c was not searched on (null in the JSON): the fixed-c sentence only
    assert uncertainty_text(summary, {**final, "activation_ratio_se_search": None}) == old


def test_a_layer_that_never_runs_is_a_clear_error() -> None:
    model, batches, _ = _tiny_subject()
    stray = torch.nn.Linear(64, 16)  # not part of the model's forward
    down = {"blocks.0.mlp.hidden": model.blocks[0].mlp.w_out, "stray": stray}
    with pytest.raises(ValueError, match="0 sequences seen by the down projections, 24 losses"):
        Subject(model, batches, MlpSites("custom", down, {})).run()
