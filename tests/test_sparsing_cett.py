"""Sparsing Law metrics: CETT, thresholds, activation ratio and dead units on hand-computed layers;
the fast CETT curve against the direct definition; truncation rules and their hooks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sparsetrace.model.transformer import ModelConfig, Transformer
from sparsetrace.sites import MlpSites, mlp_sites
from sparsetrace.sparsing.baselines import Fat, TopK, TopKBatch
from sparsetrace.sparsing.cett import (
    CettCurve,
    ThresholdGrid,
    activation_ratio,
    cett,
    dead_units,
    threshold_for_cett,
    unit_norms,
)
from sparsetrace.sparsing.truncation import (
    Threshold,
    Truncation,
)
from sparsetrace.sparsing.uncertainty import SequenceStats, ratio_se

# Hand layer: d_model 2, d_ff 3, W_out columns w0 = (1, 0), w1 = (0, 2), w2 = (3, 4): norms 1, 2, 5.
W = torch.tensor([[1.0, 0.0, 3.0], [0.0, 2.0, 4.0]])
# Token 1: a = (2, 1.5, 1): n = (2*1, 1.5*2, 1*5) = (2, 3, 5); contributions (2,0), (0,3), (3,4);
#   output (5, 7), norm sqrt(74). Token 2: a = (0, 0, 1): n = (0, 0, 5), output (3, 4).
#   Token 3 is padding (masked out): any values.
A = torch.tensor([[2.0, 1.5, 1.0], [0.0, 0.0, 1.0], [100.0, -100.0, 100.0]])
MASK = torch.tensor([True, True, False])
# CETT per tau (mean over the 2 real tokens; token 2 has no tail until its only unit goes):
#   tau <= 2:     nothing dropped                          -> 0
#   2 < tau <= 3: token 1 drops unit 0, tail (2, 0)        -> (2/sqrt(74) + 0) / 2
#   3 < tau <= 5: token 1 drops units 0, 1, tail (2, 3)    -> (sqrt(13)/sqrt(74) + 0) / 2
#   tau > 5:      everything dropped                       -> (1 + 1) / 2
CETT_2_3 = 2 / math.sqrt(74) / 2  # 0.11625
CETT_3_5 = math.sqrt(13 / 74) / 2  # 0.20956


def test_unit_norms_by_hand() -> None:
    assert unit_norms(A[:2], W).tolist() == [[2.0, 3.0, 5.0], [0.0, 0.0, 5.0]]


def test_cett_by_hand() -> None:
    taus = torch.tensor([1.0, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0])
    expected = [0, 0, CETT_2_3, CETT_2_3, CETT_3_5, CETT_3_5, 1.0]
    assert cett(A, W, taus, MASK).tolist() == pytest.approx(expected, abs=1e-7)
    # without the mask the padding token (n = 100, 200, 500) joins the mean with CETT 0 at tau 6
    assert float(cett(A, W, 6.0)) == pytest.approx(2 / 3, abs=1e-7)


def test_threshold_by_hand() -> None:
    # largest tau with CETT <= c: c = 0.15 -> 3 (CETT 0.116; any tau > 3 gives 0.210)
    t = threshold_for_cett(A, W, 0.15, MASK)
    assert (t.tau, t.cett) == (3.0, pytest.approx(CETT_2_3))
    # kept (n >= 3): token 1 units 1, 2; token 2 unit 2 -> 3 of 6 entries
    assert t.activation_ratio == pytest.approx(0.5)
    t = threshold_for_cett(A, W, 0.25, MASK)
    assert (t.tau, t.cett) == (5.0, pytest.approx(CETT_3_5))
    assert t.activation_ratio == pytest.approx(1 / 3)
    # c = 0: tau = smallest positive n = 2; zeros dropped, everything else kept: 4 of 6
    t = threshold_for_cett(A, W, 0.0, MASK)
    assert (t.tau, t.cett, t.activation_ratio) == (2.0, 0.0, pytest.approx(4 / 6))


def test_curve_by_hand() -> None:
    grid = ThresholdGrid(W)
    grid.update(A, MASK)
    assert grid.grid().tolist() == [2.0, 3.0, 5.0]  # the distinct positive norms
    curve = CettCurve(W, grid.grid())
    curve.update(A, MASK)
    assert curve.tokens == 2
    assert curve.cett.tolist() == pytest.approx([0.0, CETT_2_3, CETT_3_5], abs=1e-7)
    assert curve.activation_ratio.tolist() == pytest.approx([4 / 6, 3 / 6, 2 / 6])


def test_activation_ratio_and_dead_units_by_hand() -> None:
    assert activation_ratio(A, W, 3.0, MASK) == pytest.approx(0.5)
    assert activation_ratio(A, W, 0.0, MASK) == pytest.approx(4 / 6)  # tau 0: nonzero fraction
    # 2 tokens, 0.1%: dead = active on 0 tokens; at tau 3 unit 0 (n = 2, 0) is never kept
    assert dead_units(A, W, 3.0, MASK).tolist() == [True, False, False]
    # the 0.1% boundary: 2000 tokens, unit 0 active on 1 (< 2: dead), unit 1 on 2 (not dead)
    a = torch.zeros(2000, 3)
    a[0, 0] = a[:2, 1] = a[:, 2] = 1.0
    assert dead_units(a, W, 0.5).tolist() == [True, False, False]


def test_cett_is_not_monotone_in_general_and_the_threshold_is_still_the_largest() -> None:
    # d_model 1, contributions +1, -1.5, +10 (n = 1, 1.5, 10), output 9.5:
    # CETT: tau <= 1: 0; (1, 1.5]: 1/9.5; (1.5, 10]: 0.5/9.5 (the tail cancels); > 10: 1
    w = torch.tensor([[1.0, -1.5, 10.0]])
    a = torch.ones(1, 3)
    values = cett(a, w, torch.tensor([1.0, 1.5, 10.0])).tolist()
    assert values == pytest.approx([0.0, 1 / 9.5, 0.5 / 9.5])
    # c = 0.07: tau = 10 (CETT 0.053), although CETT(1.5) = 0.105 > c on the way
    assert threshold_for_cett(a, w, 0.07).tau == 10.0


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(2, 12),
    st.integers(1, 4),
    st.integers(0, 2**31 - 1),
)
def test_cett_monotone_for_nonnegative_contributions(
    tokens: int, d_ff: int, d_model: int, seed: int
) -> None:
    # a >= 0 (ReLU) and W >= 0: each dropped unit adds a nonnegative vector to the tail, so its
    # norm, and CETT, can only grow with tau; CETT is 0 below every norm and 1 above all.
    g = torch.Generator().manual_seed(seed)
    a = torch.relu(torch.randn(tokens, d_ff, generator=g))
    a[:, 0] = 1.0  # every token has an output
    w = torch.rand(d_model, d_ff, generator=g) + 0.01
    n = unit_norms(a, w)
    taus = torch.cat([torch.tensor([0.0]), n.flatten().sort().values, n.max()[None] + 1])
    values = cett(a, w, taus)
    assert (values.diff() >= -1e-6).all()
    assert float(values[0]) == 0.0 and float(values[-1]) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_curve_equals_direct_cett_and_threshold_is_brute_force(seed: int) -> None:
    # Signed activations and weights (CETT not monotone); the grid holds every distinct norm, so
    # the curve is the definition at every candidate and the threshold the exact largest tau.
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(40, 24, generator=g) * (torch.rand(40, 24, generator=g) > 0.3)
    w = torch.randn(6, 24, generator=g)
    mask = torch.rand(40, generator=g) > 0.2
    sampler = ThresholdGrid(w)
    sampler.update(a, mask)
    grid = sampler.grid()
    curve = CettCurve(w, grid, chunk_elements=6 * 24 * 7)  # several chunks of 7 tokens
    curve.update(a, mask)
    direct = cett(a, w, grid, mask)
    assert torch.allclose(curve.cett, direct, atol=1e-5)
    for c in (0.01, 0.1, 0.3, 0.6):
        ok = grid[direct <= c]  # every candidate = every distinct positive norm
        t = curve.threshold(c)
        assert t.tau == float(ok.max())
        assert t.activation_ratio == pytest.approx(activation_ratio(a, w, t.tau, mask))


def test_curve_skips_zeros_with_the_same_sums() -> None:
    """ReLU-like rows (mostly zeros, one row all zero, chunks whose tokens differ in their count
    of nonzeros): the curve that skips the zero columns is the definition at every candidate,
    CETT and activation ratio (zeros counted as dropped everywhere)."""
    g = torch.Generator().manual_seed(3)
    a = torch.relu(torch.randn(30, 64, generator=g) - 1.2)  # ~12 % nonzero
    a[4] = 0.0
    a[5, :40] = 1.0  # a dense token beside sparse ones in its chunk
    w = torch.randn(8, 64, generator=g)
    sampler = ThresholdGrid(w)
    sampler.update(a)
    grid = sampler.grid()
    curve = CettCurve(w, grid, chunk_elements=8 * 64 * 4)  # chunks of 4 tokens
    curve.update(a)
    every = CettCurve(w, grid, chunk_elements=8 * 64 * 4, skip_zeros=False)
    every.update(a)
    assert torch.equal(curve.tail, every.tail) and torch.equal(curve.dropped, every.dropped)
    assert torch.allclose(curve.cett, cett(a, w, grid), atol=1e-6)
    ratios = torch.tensor([activation_ratio(a, w, float(t)) for t in grid], dtype=torch.float64)
    assert torch.allclose(curve.activation_ratio, ratios, atol=1e-12)


def _linear(d_ff: int, d_model: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d_ff, d_model)


def _one(layer: nn.Module) -> MlpSites:
    """One down projection named "l", without a gate."""
    return MlpSites("custom", {"l": layer}, {})


def _seen_by(layer: nn.Linear, rule, h: torch.Tensor) -> torch.Tensor:
    """The down projection's input after the rule, as its hook passes it on."""
    seen = []
    with Truncation(_one(layer), {"l": rule}, observe=lambda _n, rows, _w: seen.append(rows)):
        out = layer(h)
    truncated = seen[0].reshape(h.shape)
    assert torch.equal(out, layer(truncated))  # the layer computed on the truncated input
    return truncated


def test_topk_keeps_exactly_k_largest_per_token() -> None:
    torch.manual_seed(1)
    h = torch.randn(4, 5, 16)  # no ties, no zeros
    kept = _seen_by(_linear(16, 8), TopK(3), h)
    assert ((kept != 0).sum(-1) == 3).all()
    top = h.abs().topk(3, dim=-1).indices
    assert torch.equal(kept.gather(-1, top), h.gather(-1, top))


def test_fat_zeroes_exactly_below_eps() -> None:
    torch.manual_seed(2)
    h = torch.randn(3, 7, 16)
    kept = _seen_by(_linear(16, 8), Fat(0.5), h)
    assert torch.equal(kept, torch.where(h.abs() < 0.5, 0.0, h))


def test_threshold_rule_drops_small_unit_norms_and_counts_activity() -> None:
    layer = _linear(16, 8)
    torch.manual_seed(3)
    h = torch.relu(torch.randn(2, 5, 16))
    n = unit_norms(h, layer.weight.detach())
    tau = float(n[n > 0].median())
    kept = _seen_by(layer, Threshold(tau), h)
    assert torch.equal(kept, torch.where(n < tau, 0.0, h))
    valid = torch.tensor([[True] * 5, [True, True, False, False, False]])
    with Truncation(_one(layer), {"l": Threshold(tau)}) as trunc:
        trunc.valid = valid
        layer(h)
    assert trunc.tokens == {"l": 7}
    assert torch.equal(trunc.active["l"], (n >= tau)[valid].sum(0))
    expected = activation_ratio(h, layer.weight.detach(), tau, valid)
    assert trunc.activation_ratio()["l"] == pytest.approx(expected)


def test_truncation_leaves_the_model_unchanged_after_exit() -> None:
    cfg = ModelConfig(n_layers=2, d_model=16, n_heads=2, d_ff=32, vocab_size=40, seq_len=8)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    sites = mlp_sites(model)
    down = sites.down
    assert down == {name: mlp.w_out for name, mlp in model.mlps().items()}
    idx = torch.randint(0, 40, (2, 8))
    before = model(idx).logits
    with torch.no_grad(), Truncation(sites, dict.fromkeys(down, TopK(4))):
        during = model(idx).logits
    assert not torch.allclose(before, during)
    with pytest.raises(RuntimeError), Truncation(sites, dict.fromkeys(down, TopK(1))):
        raise RuntimeError("inside the context")
    assert all(not m._forward_pre_hooks for m in down.values())
    assert torch.equal(model(idx).logits, before)


def test_reference_topk_is_global_over_the_batch_on_the_gate() -> None:
    """The public code's Top-k: one threshold over the whole (batch, seq, d_ff) tensor of
    |act(gate)|, zeroing int(numel * (1 - k)) entries — so tokens keep different counts."""
    gate = torch.tensor([[[0.9, 0.8, 0.7, 0.6], [0.05, 0.04, 0.03, 0.5]]])  # (1, 2, 4)
    h = torch.full_like(gate, 2.0)  # the product the down projection sees: not what decides
    keep = TopKBatch(0.5).keep(h, torch.ones(3, 4), gate)
    # numel 8, zero int(8 * 0.5) = 4 smallest |gate|: 0.03, 0.04, 0.05, 0.5.
    expected = torch.tensor([[[True, True, True, True], [False, False, False, False]]])
    assert torch.equal(keep, expected)
    per_token = TopK(2).keep(gate, torch.ones(3, 4), gate)  # ours: two per token
    assert (per_token.sum(-1) == 2).all()
    zeros = torch.tensor([[[0.0, 0.0, 0.3, 0.2]]])  # exact zeros stay zero even if "kept"
    assert torch.equal(TopKBatch(1.0).keep(zeros, torch.ones(3, 4), zeros), zeros != 0)


def test_reference_baselines_decide_on_act_gate_in_a_gated_mlp() -> None:
    """In a gated MLP the reference FAT-ε and Top-k read act(gate), captured from w_in's output;
    'ours' reads the product act(gate) * up."""
    cfg = ModelConfig(n_layers=1, d_model=16, n_heads=2, d_ff=32, vocab_size=40, seq_len=8,
                      activation="reglu")  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    mlp = model.blocks[0].mlp
    captured = {}
    mlp.w_in.register_forward_hook(lambda _m, _a, y: captured.update(gate=y.chunk(2, -1)))
    idx = torch.randint(0, 40, (2, 8))
    sites = mlp_sites(model)
    down = sites.down
    assert set(sites.gates) == set(down)
    seen = []
    rules = dict.fromkeys(down, Fat(0.3))  # reference: |act(gate)| < 0.3 zeroed
    with torch.no_grad(), Truncation(sites, rules, lambda _n, rows, _w: seen.append(rows)):
        model(idx)
    gate, up = captured["gate"]
    act_gate = torch.relu(gate).reshape(-1, 32)
    product = (torch.relu(gate) * up).reshape(-1, 32)
    assert torch.equal(seen[0], torch.where(act_gate < 0.3, 0.0, product))
    seen.clear()
    with torch.no_grad(), Truncation(sites, dict.fromkeys(down, Fat(0.3, on_gate=False)),
                                     lambda _n, rows, _w: seen.append(rows)):  # fmt: skip
        model(idx)
    assert torch.equal(seen[0], torch.where(product.abs() < 0.3, 0.0, product))
    assert len(mlp.w_in._forward_hooks) == 1  # only the test's own hook: the taps are gone


def _fixed_c_se(trunc: Truncation) -> float:
    active, tokens, widths = trunc.sequence_counts()
    n = active.shape[1]
    return ratio_se(SequenceStats(np.zeros(n), np.ones(n), active, tokens, widths))


def test_activation_ratio_standard_error_is_a_bootstrap_over_sequences() -> None:
    """Sequences that all use the same share of units give a standard error of zero; sequences
    that differ give the bootstrap's spread of the pooled ratio (checked against a direct
    numpy bootstrap of the same resamples)."""
    layer = _linear(4, 3)
    same = torch.tensor([[[1.0, 0, 0, 0]] * 2] * 6)  # 6 sequences of 2 tokens, 1 of 4 units
    with Truncation(_one(layer)) as trunc:
        layer(same)
    assert trunc.activation_ratio()["l"] == 0.25 and _fixed_c_se(trunc) == 0.0
    differ = torch.zeros(8, 2, 4)
    counts = [0, 1, 2, 3, 4, 1, 2, 3]  # active units per token, per sequence
    for i, k in enumerate(counts):
        differ[i, :, :k] = 1.0
    with Truncation(_one(layer)) as trunc:
        layer(differ)
    picks = np.random.default_rng(0).integers(0, 8, size=(1000, 8))
    per_seq = np.array(counts) * 2.0
    expected = (per_seq[picks].sum(1) / (16 * 4)).std(ddof=1)
    assert _fixed_c_se(trunc) == pytest.approx(expected)
