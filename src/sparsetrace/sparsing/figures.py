"""Figures of the Sparsing Law measurements (matplotlib without pyplot: Agg, no global state)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from sparsetrace.sparsing.laws import TOKENS_PER_UNIT, LawFit

DPI = 130
SIZE = (6.5, 4.0)  # inches


def plot_activation_ratio(csv: Path, out: Path) -> Path:
    """Activation ratio at the run's fixed CETT vs tokens seen (steps where those are unknown),
    from ``sparsing_law.csv``: one thin line per layer, the layer mean in bold. PNG to ``out``."""
    frame = pd.read_csv(csv, dtype={"layer": str})
    x = "step" if frame["tokens"].isna().all() else "tokens"
    frame = frame.sort_values(x)
    fig = Figure(figsize=SIZE, layout="constrained")
    ax = fig.add_subplot()
    for layer, rows in frame.groupby("layer", sort=True):
        overall = layer == "all"
        ax.plot(
            rows[x], rows["activation_ratio"], marker="o", markersize=3,
            linewidth=2.4 if overall else 1.0, color="black" if overall else None,
            label="mean of layers" if overall else f"layer {layer}", zorder=3 if overall else 2,
        )  # fmt: skip
    ax.set_xlabel("tokens seen" if x == "tokens" else "step")
    ax.set_ylabel("activation ratio (PPL-p%)")
    ax.grid(alpha=0.35)
    ax.legend(fontsize=8, frameon=False)
    fig.savefig(out, dpi=DPI)
    return out


def plot_law_fit(tokens: np.ndarray, ratio: np.ndarray, fit: LawFit, out: Path) -> Path:
    """The data, the fitted law and its log baseline against D (billions of tokens); PNG."""
    d = np.asarray(tokens, dtype=np.float64) / TOKENS_PER_UNIT
    grid = np.linspace(d.min(), d.max(), 400)
    fig = Figure(figsize=SIZE, layout="constrained")
    ax = fig.add_subplot()
    ax.scatter(d, ratio, s=12, color="black", label="measured", zorder=3)
    for law, style, name in ((fit, "-", f"{fit.form} law"), (fit.baseline, "--", "log baseline")):
        if law is not None:
            with np.errstate(all="ignore"):
                ax.plot(grid, law.curve(grid), style, label=f"{name} (MSE {law.mse:.2e})")
    ax.set_xlabel("D (billions of tokens)")
    ax.set_ylabel("activation ratio")
    ax.grid(alpha=0.35)
    ax.legend(fontsize=8, frameon=False)
    fig.savefig(out, dpi=DPI)
    return out
