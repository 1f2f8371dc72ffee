"""Hidden-unit use metrics (section 2.1, appendix A.6): hand-computed cases and the fast path
checked for exact equality against the naive reference in ``tests/reference.py``."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reference
import sparsetrace.metrics.use as use_module
from reference import reference_stats
from sparsetrace.metrics.use import (
    rescaled_percentiles,
    use_counts,
    use_stats,
    use_stats_from_counts,
)

CPU = torch.device("cpu")


def fast_stats(
    acts: np.ndarray,
    mask: np.ndarray | None,
    percentiles: Sequence[float],
    dtype: torch.dtype = torch.float32,
) -> dict[str, object]:
    """The fast path's results in the reference's layout (numpy arrays, float64)."""
    t_acts = torch.from_numpy(acts).to(dtype)
    t_mask = None if mask is None else torch.from_numpy(mask)
    stats = use_stats(t_acts, t_mask, percentiles)
    assert stats.per_token.device == CPU
    assert stats.hidden == acts.shape[-1]
    return {
        "counts": use_counts(t_acts, t_mask).numpy(),
        "per_token": stats.per_token.numpy(),
        "per_sequence": stats.per_sequence.numpy(),
        "per_batch": stats.per_batch.numpy(),
        "token_seq_ratio": stats.token_seq_ratio.numpy(),
        "seq_batch_ratio": stats.seq_batch_ratio.numpy(),
        "percentiles": {p: v.numpy() for p, v in stats.percentiles.items()},
        "batch_used": stats.batch_used.numpy(),
    }


IMPLS: dict[str, Callable[..., dict[str, object]]] = {
    "fast": fast_stats,
    "reference": reference_stats,
}

# batch=2, seq=3, hidden=4. Sequence 0 uses units 0 and 3; sequence 1 uses unit 1 once.
EXAMPLE = np.array(
    [
        [[1, 0, 0, 2], [0, 0, 0, 3], [5, 0, 0, 1]],
        [[0, 0, 0, 0], [0, 7, 0, 0], [0, 0, 0, 0]],
    ],
    dtype=np.float32,
)


@pytest.mark.parametrize("impl", IMPLS)
def test_hand_example_unmasked(impl: str) -> None:
    r = IMPLS[impl](EXAMPLE, None, [0.0, 50.0, 100.0])
    # counts: seq 0 -> [2, 0, 0, 3], seq 1 -> [0, 1, 0, 0]
    np.testing.assert_array_equal(r["counts"], [[2, 0, 0, 3], [0, 1, 0, 0]])
    # per token: 2,1,2 | 0,1,0 nonzero units -> 6 / 6 tokens
    assert float(r["per_token"]) == 1.0
    # per sequence: {0, 3} and {1} -> (2 + 1) / 2
    assert float(r["per_sequence"]) == 1.5
    # per batch: {0, 1, 3}
    assert float(r["per_batch"]) == 3.0
    np.testing.assert_array_equal(r["batch_used"], [True, True, False, True])
    assert float(r["token_seq_ratio"]) == pytest.approx(1.0 / 1.5, rel=1e-15)
    assert float(r["seq_batch_ratio"]) == 0.5
    pct = r["percentiles"]
    # p=50. seq 0: f = 2/4, rescaled 50*.5 + 100*.5 = 75, sorted [0,0,2,3], index .75*3 = 2.25,
    #   value 2 + .25*(3-2) = 2.25, / 3 tokens = 0.75.
    # seq 1: f = 1/4, rescaled 12.5 + 75 = 87.5, sorted [0,0,0,1], index 2.625 -> 0.625, / 3.
    # mean: (2.25/3 + 0.625/3) / 2 = 2.875 / 6.
    assert float(pct[50.0]) == pytest.approx(2.875 / 6, rel=1e-15)
    # p=100: the most-used unit: (3/3 + 1/3) / 2 = 2/3.
    assert float(pct[100.0]) == pytest.approx(2 / 3, rel=1e-15)
    # p=0. seq 0: rescaled 50, index 1.5 in [0,0,2,3] -> 0 + .5*2 = 1, / 3. seq 1: rescaled 75,
    #   index 2.25 in [0,0,0,1] -> 0 + .25*1 = 0.25, / 3. mean: (1 + 0.25) / 3 / 2 = 1.25 / 6.
    assert float(pct[0.0]) == pytest.approx(1.25 / 6, rel=1e-15)


@pytest.mark.parametrize("impl", IMPLS)
def test_hand_example_masked(impl: str) -> None:
    # Sequence 0 keeps tokens 0 and 2; sequence 1 is all padding (it alone used unit 1).
    mask = np.array([[1, 0, 1], [0, 0, 0]], dtype=bool)
    r = IMPLS[impl](EXAMPLE, mask, [50.0])
    np.testing.assert_array_equal(r["counts"], [[2, 0, 0, 2], [0, 0, 0, 0]])
    # per token: tokens [1,0,0,2] and [5,0,0,1] -> (2 + 2) / 2 real tokens
    assert float(r["per_token"]) == 2.0
    # per sequence: only sequence 0 has real tokens -> 2 (not (2 + 0) / 2)
    assert float(r["per_sequence"]) == 2.0
    # per batch: unit 1 appears only under padding -> {0, 3}
    assert float(r["per_batch"]) == 2.0
    np.testing.assert_array_equal(r["batch_used"], [True, False, False, True])
    # p=50, seq 0: counts [2,0,0,2], f = .5, rescaled 75, index 2.25 in [0,0,2,2] -> 2, / 2 real
    # tokens = 1.0; sequence 1 is left out of the mean.
    assert float(r["percentiles"][50.0]) == 1.0


@pytest.mark.parametrize("impl", IMPLS)
def test_single_token(impl: str) -> None:
    acts = np.array([[[0, 1, 0, 2, 0]]], dtype=np.float32)
    r = IMPLS[impl](acts, None, [50.0])
    assert float(r["per_token"]) == 2.0
    assert float(r["per_sequence"]) == 2.0
    assert float(r["per_batch"]) == 2.0
    assert float(r["token_seq_ratio"]) == 1.0
    assert float(r["seq_batch_ratio"]) == 1.0
    # counts [0,1,0,1,0], f = .4, rescaled 20 + 60 = 80, index 3.2 in [0,0,0,1,1] -> 1, / 1.
    assert float(r["percentiles"][50.0]) == 1.0


@pytest.mark.parametrize("impl", IMPLS)
def test_all_zero_gives_zero_use_and_nan_ratios(impl: str) -> None:
    r = IMPLS[impl](np.zeros((2, 3, 4), np.float32), None, [50.0, 100.0])
    assert float(r["per_token"]) == 0.0
    assert float(r["per_sequence"]) == 0.0
    assert float(r["per_batch"]) == 0.0
    assert math.isnan(float(r["token_seq_ratio"]))
    assert math.isnan(float(r["seq_batch_ratio"]))
    assert float(r["percentiles"][50.0]) == 0.0
    assert float(r["percentiles"][100.0]) == 0.0


@pytest.mark.parametrize("impl", IMPLS)
def test_fully_masked_batch_gives_zeros(impl: str) -> None:
    mask = np.zeros((2, 3), dtype=bool)
    r = IMPLS[impl](EXAMPLE, mask, [50.0])
    assert float(r["per_token"]) == 0.0
    assert float(r["per_sequence"]) == 0.0
    assert float(r["per_batch"]) == 0.0
    assert float(r["percentiles"][50.0]) == 0.0
    assert math.isnan(float(r["token_seq_ratio"]))


@pytest.mark.parametrize("impl", IMPLS)
def test_negative_values_are_used_and_negative_zero_is_not(impl: str) -> None:
    # Use means nonzero, for any activation function (GELU/SiLU outputs can be negative).
    acts = np.array([[[-1.0, -0.0, 0.5], [-0.0, -0.0, 0.0]]], dtype=np.float32)
    r = IMPLS[impl](acts, None, [100.0])
    np.testing.assert_array_equal(r["counts"], [[1, 0, 1]])
    assert float(r["per_token"]) == 1.0  # (2 + 0) / 2 tokens
    assert float(r["per_batch"]) == 2.0


@pytest.mark.parametrize("impl", IMPLS)
def test_stack_of_layers_gives_per_layer_results(impl: str) -> None:
    stack = np.stack([EXAMPLE, np.zeros_like(EXAMPLE), EXAMPLE[:, :, ::-1]])
    r = IMPLS[impl](np.ascontiguousarray(stack), None, [50.0])
    np.testing.assert_array_equal(r["per_token"], [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(r["per_batch"], [3.0, 0.0, 3.0])
    np.testing.assert_array_equal(r["batch_used"][2], [True, False, True, True])
    assert r["percentiles"][50.0].shape == (3,)
    assert float(r["percentiles"][50.0][1]) == 0.0
    # Reversing the unit order leaves order statistics unchanged.
    assert float(r["percentiles"][50.0][2]) == pytest.approx(2.875 / 6, rel=1e-15)


def test_rescaled_percentiles_from_counts_by_hand() -> None:
    # One sequence of 10 tokens, hidden 5, counts [0, 10, 0, 4, 6]: f = 3/5.
    counts = torch.tensor([[0, 10, 0, 4, 6]], dtype=torch.int32)
    got = rescaled_percentiles(counts, torch.tensor([10]), [0.0, 50.0, 100.0])
    # sorted [0,0,4,6,10]. p=0: rescaled 40, index 1.6 -> 0 + .6*4 = 2.4 -> 0.24.
    # p=50: rescaled 30 + 40 = 70, index 2.8 -> 4 + .8*2 = 5.6 -> 0.56. p=100: 10 -> 1.0.
    np.testing.assert_allclose(got.numpy(), [0.24, 0.56, 1.0], rtol=1e-15)
    assert got.dtype == torch.float64


def test_use_counts_dtype_device_and_mask_shapes() -> None:
    acts = torch.from_numpy(EXAMPLE)
    counts = use_counts(acts)
    assert counts.dtype == torch.int32
    assert counts.device == CPU
    # A (batch, seq) mask is shared by every layer of a stack.
    stack = torch.stack([acts, acts])
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]])
    np.testing.assert_array_equal(
        use_counts(stack, mask).numpy(), [[[2, 0, 0, 2], [0, 1, 0, 0]]] * 2
    )


@pytest.mark.parametrize("chunk_bytes", [1, 1000, use_module._CHUNK_BYTES])
def test_use_counts_beyond_255_tokens(chunk_bytes: int) -> None:
    """Counts above the uint8 range of one chunk's partial sums (CPU path adds chunks in uint8)."""
    acts = torch.ones(2, 600, 3)
    acts[1, :, 1] = 0.0
    mask = torch.ones(2, 600, dtype=torch.bool)
    mask[0, 500:] = False
    with mock.patch.object(use_module, "_CHUNK_BYTES", chunk_bytes):
        np.testing.assert_array_equal(use_counts(acts).numpy(), [[600] * 3, [600, 0, 600]])
        np.testing.assert_array_equal(use_counts(acts, mask).numpy(), [[500] * 3, [600, 0, 600]])


def test_use_counts_of_non_contiguous_and_integer_input() -> None:
    acts = torch.from_numpy(EXAMPLE)
    want = [[2, 0, 0, 3], [0, 1, 0, 0]]
    # A (hidden, seq) layout transposed into (seq, hidden): a strided view, not a copy.
    strided = acts.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not strided.is_contiguous()
    np.testing.assert_array_equal(use_counts(strided).numpy(), want)
    np.testing.assert_array_equal(use_counts(acts.to(torch.int64)).numpy(), want)
    np.testing.assert_array_equal(use_counts(acts != 0).numpy(), want)


def test_bad_shapes_and_percentiles_raise() -> None:
    with pytest.raises(ValueError, match="batch, seq, hidden"):
        use_counts(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="mask shape"):
        use_counts(torch.zeros(2, 3, 4), torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        use_stats(torch.zeros(2, 3, 4), percentiles=[50.0, 100.5])
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        use_stats(torch.zeros(2, 3, 4), percentiles=[-1.0])


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@st.composite
def activation_cases(draw: st.DrawFn) -> dict[str, object]:
    """Random activations with per-unit use rates, dead units, dead sequences and masks."""
    layers = draw(st.sampled_from([(), (1,), (2,), (3,)]))
    batch, seq, hidden = draw(st.integers(1, 5)), draw(st.integers(1, 40)), draw(st.integers(1, 70))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    density = draw(st.sampled_from([0.0, 0.01, 0.05, 0.2, 0.5, 0.9, 1.0]))
    dead_unit_frac = draw(st.sampled_from([0.0, 0.3, 1.0]))
    dead_seq_frac = draw(st.sampled_from([0.0, 0.5]))
    mask_kind = draw(st.sampled_from(["none", "shared", "per_layer"]))
    keep = draw(st.sampled_from([0.0, 0.5, 0.9, 1.0]))

    shape = (*layers, batch, seq, hidden)
    rates = np.clip(density * rng.uniform(0.0, 2.0, hidden), 0.0, 1.0)
    rates[rng.random(hidden) < dead_unit_frac] = 0.0
    used = rng.random(shape) < rates
    used[..., rng.random(batch) < dead_seq_frac, :, :] = False
    # Multiples of 1/4 up to 2 in magnitude are exact in float16 and bfloat16; zeros are a mix
    # of +0 and -0, both unused.
    values = rng.integers(1, 9, shape) * rng.choice([-0.25, 0.25], shape)
    zeros = np.where(rng.random(shape) < 0.5, -0.0, 0.0)
    acts = np.where(used, values, zeros).astype(np.float32)

    mask = None
    if mask_kind != "none":
        mask_shape = (batch, seq) if mask_kind == "shared" else (*layers, batch, seq)
        mask = rng.random(mask_shape) < keep
        mask[..., rng.random(batch) < 0.3, :] = False  # some fully padded sequences
    percentiles = draw(
        st.lists(st.floats(0.0, 100.0, allow_nan=False), min_size=1, max_size=4, unique=True)
        | st.just([50.0, 65.0, 75.0, 90.0])
        | st.just([0.0, 100.0])
    )
    return {
        "acts": acts,
        "mask": mask,
        "dtype": draw(st.sampled_from(sorted(DTYPES))),
        "percentiles": percentiles,
        # use_counts' CPU buffer size: 1 byte gives one token per chunk; the default, one chunk.
        "chunk_bytes": draw(st.sampled_from([1, 300, 5000, use_module._CHUNK_BYTES])),
    }


def assert_same(got: dict[str, object], want: dict[str, object]) -> None:
    """Exact equality, except the mean over sequences of the percentile fractions: torch and the
    reference add the per-sequence values in different orders (exact per sequence: see below)."""
    for key in got:
        if key == "percentiles":
            assert got[key].keys() == want[key].keys()
            for p in want[key]:
                np.testing.assert_allclose(
                    got[key][p], want[key][p], rtol=1e-14, atol=0, err_msg=f"p={p}"
                )
        else:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def fast_seq_percentiles(
    acts: torch.Tensor, mask: torch.Tensor | None, percentiles: Sequence[float]
) -> np.ndarray:
    """Per-sequence rescaled percentiles (..., batch, P): each sequence as its own group of one."""
    counts = use_counts(acts, mask)
    if mask is None:
        lens = torch.full(counts.shape[:-1], acts.shape[-2])
    else:
        lens = mask.sum(-1).expand(counts.shape[:-1])
    hidden = counts.shape[-1]
    per_seq = rescaled_percentiles(counts.reshape(-1, 1, hidden), lens.reshape(-1, 1), percentiles)
    return per_seq.reshape(*counts.shape[:-1], len(percentiles)).numpy()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(activation_cases())
def test_fast_path_equals_reference(case: dict[str, object]) -> None:
    acts, mask, pcts = case["acts"], case["mask"], case["percentiles"]
    want = reference_stats(acts, mask, pcts)
    dtype = DTYPES[case["dtype"]]
    t_mask = None if mask is None else torch.from_numpy(mask)
    with mock.patch.object(use_module, "_CHUNK_BYTES", case["chunk_bytes"]):
        got = fast_stats(acts, mask, pcts, dtype)
        seq_pcts = fast_seq_percentiles(torch.from_numpy(acts).to(dtype), t_mask, pcts)
    assert_same(got, want)
    real = ~np.isnan(want["seq_percentiles"])
    # np.percentile's index arithmetic and interpolation, reproduced bit for bit per sequence.
    np.testing.assert_array_equal(seq_pcts[real], want["seq_percentiles"][real])
    for p in pcts:
        assert bool(((got["percentiles"][p] >= 0) & (got["percentiles"][p] <= 1)).all())


def test_fractions_divide_by_hidden() -> None:
    stats = use_stats(torch.from_numpy(EXAMPLE))
    assert float(stats.per_token_frac) == 1.0 / 4
    assert float(stats.per_sequence_frac) == 1.5 / 4
    assert float(stats.per_batch_frac) == 3.0 / 4


@settings(max_examples=40, deadline=None)
@given(activation_cases())
def test_from_counts_equals_use_stats(case: dict[str, object]) -> None:
    """The trainer's route (counts + lengths) gives what the one-call route gives."""
    acts, mask, pcts = torch.from_numpy(case["acts"]), case["mask"], case["percentiles"]
    t_mask = None if mask is None else torch.from_numpy(mask)
    direct = use_stats(acts, t_mask, pcts)
    counts = use_counts(acts, t_mask)
    if t_mask is None:
        via = use_stats_from_counts(counts, acts.shape[-2], pcts)
    else:
        via = use_stats_from_counts(counts, t_mask.sum(-1).expand(counts.shape[:-1]), pcts)
    for key in ("per_token", "per_sequence", "per_batch", "batch_used"):
        torch.testing.assert_close(getattr(via, key), getattr(direct, key), rtol=0, atol=0)
    for p in direct.percentiles:
        torch.testing.assert_close(via.percentiles[p], direct.percentiles[p], rtol=0, atol=0)


def test_per_sequence_percentiles_match_numpy_bit_for_bit() -> None:
    """Many count vectors and percentiles at once: interpolation rounding included (numpy takes
    the upper end when t >= 0.5), the per-sequence value equals the literal A.6.1 one."""
    rng = np.random.default_rng(0)
    rows = []
    for hidden in range(1, 71):
        for seq_len in (1, 3, 40):
            counts = rng.integers(0, seq_len + 1, hidden) * (rng.random(hidden) < 0.6)
            rows.append((counts, seq_len))
    pcts = [float(p) for p in np.linspace(0.0, 100.0, 41)] + [12.5, 33.3, 99.9]
    for counts, seq_len in rows:
        got = rescaled_percentiles(
            torch.from_numpy(counts).reshape(1, 1, -1), torch.tensor([[seq_len]]), pcts
        ).reshape(-1)
        # The literal A.6.1 code on a (seq, hidden) 0/1 array with these column sums.
        seq = (np.arange(seq_len)[:, None] < counts[None, :]).astype(np.int32)
        want = [reference.percentile_used_dimension_count(seq, p) for p in pcts]
        np.testing.assert_array_equal(got.numpy(), want, err_msg=f"counts={counts.tolist()}")


def test_use_counts_traces_into_a_compiled_graph() -> None:
    """The trainer counts inside a compiled forward: the counts must trace as one graph."""
    acts = torch.from_numpy(np.ascontiguousarray(np.tile(EXAMPLE, (1, 100, 1))))  # seq 300
    mask = torch.rand(2, 300, generator=torch.Generator().manual_seed(0)) < 0.7
    compiled = torch.compile(use_counts, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(acts, mask), use_counts(acts, mask), rtol=0, atol=0)
    torch.testing.assert_close(compiled(acts, None), use_counts(acts), rtol=0, atol=0)
