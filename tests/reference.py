"""Naive reference for the hidden-unit use metrics: slow on purpose, obviously correct.

Transcribes Wild & Anderson appendix A.6 literally (Python loops over sequences and tokens,
``np.percentile`` with its default linear interpolation), applied to the 0/1 use indicator
``acts != 0``. Padding conventions (the paper has none): masked tokens are dropped before any
metric, a sequence's length is its number of real tokens, per-token use pools all real tokens of
the batch, and sequences without a real token are left out of every per-sequence average.
The fast implementation in ``sparsetrace.metrics.use`` is tested against this module.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def get_rescaled_percentile(fract_nonzero: float, desired_percentile: float) -> float:
    """A.6.1 ``get_rescaled_percentile``: map a percentile of the used units onto all units."""
    fract_zero = 1 - fract_nonzero
    rescaled_percentile = desired_percentile * fract_nonzero + 100 * fract_zero
    # Rounding can land a hair above 100 (np.percentile would raise); 100 is the exact value.
    return min(rescaled_percentile, 100.0)


def percentile_used_dimension_count(seq: np.ndarray, percentile: float) -> float:
    """A.6.1 ``percentile_used_dimension_count`` on a 0/1 use array (sequence, hidden)."""
    seq_dim = seq.shape[0]
    use_count_by_dimension = np.sum(seq, axis=0)
    frac_dimensions_gt_0 = np.sum(use_count_by_dimension > 0) / use_count_by_dimension.shape[0]
    new_percentile = get_rescaled_percentile(frac_dimensions_gt_0, percentile)
    return float(np.percentile(use_count_by_dimension, new_percentile) / seq_dim)


def sequence_total_dimensions_used(seq: np.ndarray) -> int:
    """A.6.2 ``sequence_total_dimensions_used`` on a 0/1 use array (sequence, hidden)."""
    summed_activations_over_sequence = np.sum(seq, axis=0)
    return int(np.sum((summed_activations_over_sequence > 0).astype(np.int32)))


def token_dimensions_used(token: np.ndarray) -> int:
    """Section 2.1 metric 1 for one token: its number of nonzero hidden units."""
    return int(np.sum(token != 0))


def mean(values: list[float]) -> float:
    """Plain left-to-right mean; 0.0 for no values (a batch without real tokens)."""
    total = 0.0
    for v in values:
        total += v
    return total / len(values) if values else 0.0


def ratio(num: float, den: float) -> float:
    """Table 1's dimension ratios; NaN for 0/0."""
    return num / den if den > 0 else float("nan")


def layer_stats(
    acts: np.ndarray, mask: np.ndarray | None, percentiles: Sequence[float]
) -> dict[str, object]:
    """All section 2.1 / A.6 metrics of one layer's activations (batch, sequence, hidden)."""
    batch, seq_len, hidden = acts.shape
    use = (acts != 0).astype(np.int32)
    real_mask = np.ones((batch, seq_len), bool) if mask is None else mask.astype(bool)

    token_counts: list[float] = []
    seq_counts: list[float] = []
    pct_values: dict[float, list[float]] = {float(p): [] for p in percentiles}
    # Per sequence and percentile, before averaging; NaN for sequences without real tokens.
    seq_pcts = np.full((batch, len(percentiles)), np.nan)
    real_tokens: list[np.ndarray] = []
    for b in range(batch):
        seq = use[b][real_mask[b]]  # the real tokens of sequence b
        if seq.shape[0] == 0:
            continue
        for token in seq:
            token_counts.append(token_dimensions_used(token))
            real_tokens.append(token)
        seq_counts.append(sequence_total_dimensions_used(seq))
        for i, p in enumerate(percentiles):
            seq_pcts[b, i] = percentile_used_dimension_count(seq, p)
            pct_values[float(p)].append(seq_pcts[b, i])

    # A.6.2 total_batch_dimensions_used: the flattened batch is every real token.
    flat = np.array(real_tokens, dtype=np.int32).reshape(-1, hidden)
    per_token = mean(token_counts)
    per_sequence = mean(seq_counts)
    per_batch = float(sequence_total_dimensions_used(flat))
    return {
        "counts": np.array([use[b][real_mask[b]].sum(axis=0) for b in range(batch)]),
        "per_token": per_token,
        "per_sequence": per_sequence,
        "per_batch": per_batch,
        "token_seq_ratio": ratio(per_token, per_sequence),
        "seq_batch_ratio": ratio(per_sequence, per_batch),
        "percentiles": {p: mean(v) for p, v in pct_values.items()},
        "seq_percentiles": seq_pcts,
        "batch_used": flat.sum(axis=0) > 0,
    }


def reference_stats(
    acts: np.ndarray,
    mask: np.ndarray | None = None,
    percentiles: Sequence[float] = (50.0, 65.0, 75.0, 90.0),
) -> dict[str, object]:
    """:func:`layer_stats` for activations (..., batch, seq, hidden), one layer at a time.

    mask: (batch, seq) or (..., batch, seq). Scalars become arrays of the leading shape ``...``;
    ``percentiles`` maps each percentile to such an array; ``counts`` and ``batch_used`` gain the
    leading shape in front, as does ``seq_percentiles`` (batch, len(percentiles)).
    """
    lead = acts.shape[:-3]
    masks = None if mask is None else np.broadcast_to(mask, lead + acts.shape[-3:-1])
    per_layer = {
        idx: layer_stats(acts[idx], None if masks is None else masks[idx], percentiles)
        for idx in np.ndindex(lead)
    }

    def stack(get) -> np.ndarray:
        values = [get(per_layer[idx]) for idx in np.ndindex(lead)]
        first = np.asarray(values[0])
        return np.array(values).reshape(lead + first.shape)

    out: dict[str, object] = {
        key: stack(lambda s, k=key: s[k])
        for key in (
            "counts",
            "per_token",
            "per_sequence",
            "per_batch",
            "token_seq_ratio",
            "seq_batch_ratio",
            "batch_used",
            "seq_percentiles",
        )
    }
    out["percentiles"] = {
        float(p): stack(lambda s, p=float(p): s["percentiles"][p]) for p in percentiles
    }
    return out
