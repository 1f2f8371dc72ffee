"""Hidden-unit use: per token, per sequence, per batch, and rescaled percentiles.

Paper: Wild & Anderson, section 2.1 (definitions) and appendix A.6 (pseudocode).

Everything is computed from one *sufficient statistic*: ``counts[..., b, h]``, the number of real
tokens of sequence ``b`` on which unit ``h`` is nonzero. Reading the activation tensor once
(:func:`use_counts`) is the only pass over the big tensor; all metrics then come from ``counts``
(shape (..., batch, hidden), integers in 0..seq) in time independent of the sequence length.
The trainer computes ``counts`` inside the model's forward pass (hooks do not survive
``torch.compile``) and hands them to :func:`use_stats_from_counts`.

Leading dimensions ``...`` are arbitrary: hand a stack of layers, shape (layers, batch, seq,
hidden), to get per-layer results in one call.

Conventions where the paper is silent (documented in docs/metrics.md):
- A unit is *used* by a token when its activation is nonzero (for ReLU: > 0), for any activation.
- With a padding mask, per-token use is the mean over real tokens (pooled over the batch);
  sequences without any real token are left out of the per-sequence averages.
- The percentile pseudocode of A.6.1 is applied to the 0/1 use indicator, so that
  ``use_count_by_dimension`` is a count of tokens, as the text of 2.1 and Table 3 describe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

DEFAULT_PERCENTILES: tuple[float, ...] = (50.0, 65.0, 75.0, 90.0)
# Bounds of use_counts' bool buffer on CPU: at most what stays in the last-level cache; at least
# enough tokens per chunk that per-op overhead does not dominate small inputs.
_CHUNK_BYTES = 4 << 20
_MIN_CHUNK_BYTES = 256 << 10


def use_counts(acts: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per sequence and unit, the number of (real) tokens on which the unit is nonzero.

    acts: (..., batch, seq, hidden), any float dtype and device. mask: (batch, seq) or
    (..., batch, seq), true/1 for real tokens. Returns int32 (..., batch, hidden) on acts' device.
    """
    if acts.dim() < 3:
        raise ValueError(
            f"activations must be (..., batch, seq, hidden); got shape {tuple(acts.shape)}"
        )
    keep = None if mask is None else _as_bool_mask(mask, acts).unsqueeze(-1)
    # Accelerators, and graphs being compiled (which fuse this themselves): one expression.
    if acts.device.type != "cpu" or torch.compiler.is_compiling():
        used = acts != 0
        return (used if keep is None else used & keep).sum(dim=-2, dtype=torch.int32)
    # CPU: a whole-tensor bool intermediate (a quarter of the input) costs page faults and a
    # trip through memory. Instead, convert a few tokens at a time into a cache-sized bool buffer
    # (float->bool conversion is x != 0 and runs ~3x faster than torch.ne) and add them up in
    # uint8, exact for at most 255 tokens per chunk. The buffer is fresh memory on every call
    # (page faults again), so it is kept to about an eighth of the input's element count.
    seq, hidden = acts.shape[-2:]
    rows = acts.numel() // max(1, seq * hidden)  # sequences over all leading dims
    buf_bytes = min(_CHUNK_BYTES, max(_MIN_CHUNK_BYTES, acts.numel() // 8))
    chunk = max(1, min(seq, 255, buf_bytes // max(1, rows * hidden)))
    counts = torch.zeros(*acts.shape[:-2], hidden, dtype=torch.int32)
    buf = torch.empty(*acts.shape[:-2], chunk, hidden, dtype=torch.bool)
    for start in range(0, seq, chunk):
        used = buf[..., : min(chunk, seq - start), :]
        used.copy_(acts[..., start : start + chunk, :])
        if keep is not None:
            used &= keep[..., start : start + chunk, :]
        counts += used.sum(dim=-2, dtype=torch.uint8)
    return counts


def _as_bool_mask(mask: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    if mask.shape[-2:] != acts.shape[-3:-1]:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match activations' (batch, seq) "
            f"{tuple(acts.shape[-3:-1])}"
        )
    return mask.to(device=acts.device, dtype=torch.bool)


@dataclass(frozen=True)
class UseStats:
    """Per-layer use statistics of one batch. Tensors have the leading shape ``...`` of the input.

    Counts are in hidden units; ``*_frac`` are fractions of ``hidden`` (the paper prints percent).
    ``percentiles`` maps each requested percentile to the mean over sequences of the fraction of
    the sequence's tokens on which the rescaled-percentile unit is used (A.6.1).
    ``batch_used`` is the per-batch use mask (..., hidden), the input of the lifecycle tracker.
    """

    hidden: int
    per_token: torch.Tensor
    per_sequence: torch.Tensor
    per_batch: torch.Tensor
    percentiles: dict[float, torch.Tensor]
    batch_used: torch.Tensor

    @property
    def per_token_frac(self) -> torch.Tensor:
        return self.per_token / self.hidden

    @property
    def per_sequence_frac(self) -> torch.Tensor:
        return self.per_sequence / self.hidden

    @property
    def per_batch_frac(self) -> torch.Tensor:
        return self.per_batch / self.hidden

    @property
    def token_seq_ratio(self) -> torch.Tensor:
        """Table 1's Token/Seq Dims; NaN where per-sequence use is 0 (0/0)."""
        return _ratio(self.per_token, self.per_sequence)

    @property
    def seq_batch_ratio(self) -> torch.Tensor:
        """Table 1's Seq/Batch Dims; NaN where per-batch use is 0 (0/0)."""
        return _ratio(self.per_sequence, self.per_batch)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    nan = torch.full_like(num, float("nan"))
    return torch.where(den > 0, num / den.clamp_min(1e-30), nan)


def use_stats(
    acts: torch.Tensor,
    mask: torch.Tensor | None = None,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> UseStats:
    """All use metrics of one batch of activations (..., batch, seq, hidden); see module doc."""
    counts = use_counts(acts, mask)
    if mask is None:
        seq_lens = torch.full(counts.shape[:-1], acts.shape[-2], device=counts.device)
    else:
        seq_lens = _as_bool_mask(mask, acts).sum(-1).expand(counts.shape[:-1])
    return use_stats_from_counts(counts, seq_lens, percentiles)


def use_stats_from_counts(
    counts: torch.Tensor,
    seq_lens: torch.Tensor | int,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> UseStats:
    """Use metrics from per-sequence use counts (..., batch, hidden) and real lengths (..., batch).

    Per-token use = used (token, unit) pairs / real tokens; per-sequence use = units with a nonzero
    count, averaged over sequences with at least one real token; per-batch use = units used by any
    sequence (section 2.1, metrics 1-3).
    """
    hidden = counts.shape[-1]
    if not isinstance(seq_lens, torch.Tensor):
        seq_lens = torch.full(counts.shape[:-1], int(seq_lens), device=counts.device)
    seq_lens = seq_lens.to(counts.device)
    real = seq_lens > 0
    n_tokens = seq_lens.sum(-1).clamp_min(1).double()
    n_seqs = real.sum(-1).clamp_min(1).double()
    per_token = counts.sum(dim=(-2, -1), dtype=torch.float64) / n_tokens
    seq_used = counts > 0
    per_sequence = (seq_used.sum(-1, dtype=torch.float64) * real).sum(-1) / n_seqs
    batch_used = seq_used.any(dim=-2)
    per_batch = batch_used.sum(-1, dtype=torch.float64)
    pct = rescaled_percentiles(counts, seq_lens, percentiles)
    return UseStats(
        hidden=hidden,
        per_token=per_token,
        per_sequence=per_sequence,
        per_batch=per_batch,
        percentiles={float(p): pct[..., i] for i, p in enumerate(percentiles)},
        batch_used=batch_used,
    )


def rescaled_percentiles(
    counts: torch.Tensor, seq_lens: torch.Tensor, percentiles: Sequence[float]
) -> torch.Tensor:
    """A.6.1 ``percentile_used_dimension_count``, averaged over sequences, for each percentile.

    Per sequence: f = fraction of units with a nonzero count; the percentile p is rescaled to
    ``p*f + 100*(1-f)`` and taken (numpy's default linear interpolation) over the counts of *all*
    units, which puts it inside the nonzero counts; the result is divided by the sequence length.
    Counts are integers in 0..seq, so the order statistics come from a per-sequence histogram and
    its cumulative sum instead of a sort. Returns float64 (..., len(percentiles)).
    """
    for p in percentiles:
        if not 0.0 <= float(p) <= 100.0:
            raise ValueError(f"percentiles must lie in [0, 100]; got {p}")
    lead, (batch, hidden) = counts.shape[:-2], counts.shape[-2:]
    flat = counts.reshape(-1, hidden).long()
    lens = seq_lens.reshape(-1).to(flat.device)
    max_count = int(lens.max().item()) if lens.numel() else 0
    # The float64 index arithmetic mirrors numpy's, so results match np.percentile exactly.
    fdtype = torch.float32 if flat.device.type == "mps" else torch.float64
    hist = torch.zeros(flat.shape[0], max_count + 1, dtype=torch.long, device=flat.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat))
    cdf = hist.cumsum(-1)  # cdf[v] = number of units with count <= v

    frac_used = (flat > 0).sum(-1).to(fdtype) / hidden
    p = torch.tensor([float(q) for q in percentiles], dtype=fdtype, device=flat.device)
    rescaled = p[None, :] * frac_used[:, None] + 100.0 * (1.0 - frac_used[:, None])
    index = rescaled / 100.0 * (hidden - 1)
    lo = index.floor().clamp(0, hidden - 1)
    hi = index.ceil().clamp(0, hidden - 1)
    v_lo = torch.searchsorted(cdf, lo.long(), right=True).to(fdtype)
    v_hi = torch.searchsorted(cdf, hi.long(), right=True).to(fdtype)
    value = _numpy_lerp(v_lo, v_hi, index - lo)

    denom = lens.to(fdtype).clamp_min(1.0)[:, None]
    per_seq = (value / denom).reshape(*lead, batch, len(percentiles))
    real = (seq_lens > 0).to(fdtype).reshape(*lead, batch, 1)
    return (per_seq * real).sum(-2) / real.sum(-2).clamp_min(1.0)


def _numpy_lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """numpy's ``_lerp``: a + (b-a)*t, computed from the nearer end for t >= 0.5."""
    diff = b - a
    return torch.where(t >= 0.5, b - diff * (1.0 - t), a + diff * t)
