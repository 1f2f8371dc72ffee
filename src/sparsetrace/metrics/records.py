"""Use metrics of one activation array as a JSON record, and records as an aligned text table.

Paper: Wild & Anderson, section 2.1 and Tables 1 and 3 (which print percent; records hold
fractions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from sparsetrace.metrics.use import use_stats


def stats_record(acts: torch.Tensor, percentiles: Sequence[float]) -> dict:
    """Section 2.1 metrics and A.6.1 percentiles of activations (batch, seq, hidden), as floats.

    Ratios are None where undefined (0/0); ``percentiles`` maps ``f"{p:g}"`` to a fraction of the
    sequence's tokens.
    """
    if acts.dim() != 3:
        raise ValueError(f"activations must be (batch, seq, hidden); got {tuple(acts.shape)}")
    batch, seq, hidden = acts.shape
    stats = use_stats(acts, percentiles=percentiles)
    return {
        "batch": int(batch),
        "seq": int(seq),
        "hidden": int(hidden),
        "per_token": float(stats.per_token),
        "per_sequence": float(stats.per_sequence),
        "per_batch": float(stats.per_batch),
        "per_token_frac": float(stats.per_token_frac),
        "per_sequence_frac": float(stats.per_sequence_frac),
        "per_batch_frac": float(stats.per_batch_frac),
        "token_seq_ratio": _finite_or_none(stats.token_seq_ratio),
        "seq_batch_ratio": _finite_or_none(stats.seq_batch_ratio),
        "percentiles": {f"{p:g}": float(stats.percentiles[float(p)]) for p in percentiles},
    }


def _finite_or_none(value: torch.Tensor) -> float | None:
    # JSON has no NaN; None (null) marks the 0/0 ratios.
    x = float(value)
    return None if math.isnan(x) else x


def format_records(records: dict[str, dict]) -> str:
    """Table 1 / Table 3 style text table: one row per array, use in percent of hidden units."""
    pct_keys: list[str] = []
    for rec in records.values():
        pct_keys += [k for k in rec["percentiles"] if k not in pct_keys]
    header = ["name", "shape", "per-token %", "per-seq %", "per-batch %", "Tok/Seq", "Seq/Batch"]
    header += [f"p{k} %" for k in pct_keys]
    rows = [header]
    for name, rec in records.items():
        pcts = rec["percentiles"]
        rows.append(
            [
                name,
                f"{rec['batch']}x{rec['seq']}x{rec['hidden']}",
                f"{100 * rec['per_token_frac']:.2f}",
                f"{100 * rec['per_sequence_frac']:.2f}",
                f"{100 * rec['per_batch_frac']:.2f}",
                _fmt_ratio(rec["token_seq_ratio"]),
                _fmt_ratio(rec["seq_batch_ratio"]),
                *(f"{100 * pcts[k]:.2f}" if k in pcts else "-" for k in pct_keys),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    # Names and shapes read left to right; numbers line up on the right.
    lines = [
        "  ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]
    return "\n".join(lines)


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
