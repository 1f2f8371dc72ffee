"""The report's figures: matplotlib without pyplot (no global state), PNG and SVG.

One helper, :func:`layer_metric_figure`, draws every "metric over training, one line per layer"
figure; a layer keeps its colour in every figure of a report (:func:`layer_color`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from sparsetrace.report.rundata import RunData

DPI = 130
SINGLE = (6.5, 4.0)  # inches, one panel
PANEL = (4.2, 3.2)  # inches per panel in a multi-run grid: two columns stay readable at 100 %
MAX_COLUMNS = 2
MARKER_BELOW = 40  # draw point markers when a line has fewer points than this
STEP_LABEL = "training step"
STYLE = {
    "font.family": "DejaVu Sans",
    "font.size": 10,
    "axes.titlesize": 10.5,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.35,
    "grid.linewidth": 0.6,
    "lines.linewidth": 1.6,
    "svg.fonttype": "none",  # SVG keeps text as text: small files, selectable labels
}


@contextmanager
def style() -> Iterator[None]:
    """The report's matplotlib style, for creating and saving figures."""
    with mpl.rc_context(STYLE):
        yield


def layer_color(layer: int, n_layers: int) -> tuple[float, float, float, float]:
    """Fixed colour of a layer index: tab10 up to 10 layers, viridis (by depth) beyond."""
    if n_layers <= 10:
        return mpl.colormaps["tab10"](layer % 10)
    return mpl.colormaps["viridis"](0.92 * layer / max(n_layers - 1, 1))


def save(fig: Figure, directory: Path, key: str) -> None:
    """Write figures/KEY.png and figures/KEY.svg."""
    fig.savefig(directory / f"{key}.png", dpi=DPI)
    fig.set_layout_engine("none")  # keep the layout computed for the PNG: the SVG is the same
    fig.savefig(directory / f"{key}.svg", dpi=DPI)


def _steps(value: float, _pos: int) -> str:
    return f"{value / 1000:g}k" if abs(value) >= 10_000 else f"{value:g}"


def _grid(n: int, sharey: bool) -> tuple[Figure, list[Axes]]:
    cols = min(n, MAX_COLUMNS)
    rows = -(-n // cols)
    size = SINGLE if n == 1 else (PANEL[0] * cols + 1.1, PANEL[1] * rows)
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharey=sharey).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    for ax in axes[:n]:
        ax.xaxis.set_major_formatter(FuncFormatter(_steps))
        ax.set_xlabel(STEP_LABEL)
    return fig, list(axes[:n])


def _mark_warmup(ax: Axes, rd: RunData, until: float | None = None) -> None:
    warmup = rd.warmup_steps
    if warmup and (until is None or warmup <= until):
        ax.axvline(warmup, color="0.45", linestyle=":", linewidth=1.2, label="end of warm-up")


def _legend(fig: Figure, axes: list[Axes]) -> None:
    """One legend for the figure, right of the panels, layers in index order."""
    entries: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)

    def order(label: str) -> tuple[int, int]:
        return (0, int(label.split()[1])) if label.startswith("layer ") else (1, 0)

    labels = sorted(entries, key=order)
    fig.legend([entries[k] for k in labels], labels, loc="outside right upper")


def layer_metric_figure(
    runs: list[RunData], column: str, ylabel: str, early: bool = False, scale: float = 100.0
) -> Figure | None:
    """``column`` of the sparsity log over training, one line per layer, one panel per run.

    ``early`` limits each run to its early-training window (RunData.early_end). None when no
    run has the column.
    """
    present = [rd for rd in runs if column in rd.series and rd.series[column].notna().any()]
    if not present:
        return None
    n_colors = max(max(rd.layer_ids, default=0) + 1 for rd in runs)
    fig, axes = _grid(len(present), sharey=True)
    for ax, rd in zip(axes, present, strict=True):
        until = rd.early_end() if early else None
        for layer, group in rd.series.groupby("layer"):
            data = group if until is None else group[group["step"] <= until]
            ax.plot(
                data["step"], data[column].astype(float) * scale,
                color=layer_color(int(layer), n_colors), label=f"layer {int(layer)}",
                marker="o" if len(data) < MARKER_BELOW else None, markersize=3,
            )  # fmt: skip
        _mark_warmup(ax, rd, until)
        ax.set_ylim(bottom=0)
        if len(present) > 1:
            ax.set_title(rd.label)
    _label_first_column(axes, ylabel)
    _legend(fig, axes)
    return fig


def deaths_figure(runs: list[RunData]) -> Figure | None:
    """Units switching off per measured interval, per layer, with the LR schedule on a twin axis."""
    present = [rd for rd in runs if any(len(t) > 1 for t in rd.transitions.values())]
    if not present:
        return None
    n_colors = max(max(rd.layer_ids, default=0) + 1 for rd in runs)
    fig, axes = _grid(len(present), sharey=False)
    for ax, rd in zip(axes, present, strict=True):
        for layer, t in rd.transitions.items():
            t = t.iloc[1:]
            ax.plot(
                t["step"], 100 * t["off"] / t["hidden"], color=layer_color(layer, n_colors),
                label=f"layer {layer}", marker="o" if len(t) < MARKER_BELOW else None,
                markersize=3,
            )  # fmt: skip
        _mark_warmup(ax, rd)
        ax.set_ylim(bottom=0)
        train = rd.run.train
        if "lr" in train and train["lr"].notna().any():
            twin = ax.twinx()
            twin.spines["right"].set_visible(True)
            twin.grid(False)
            exponent = _lr_exponent([train["lr"].max()])
            _plot_lr(twin, train, exponent, color="0.35", linestyle="--", linewidth=1.1)
            # An empty stand-in on the main axes puts the LR line into the figure legend.
            ax.plot([], [], color="0.35", linestyle="--", linewidth=1.1, label="learning rate")
        if len(present) > 1:
            ax.set_title(rd.label)
    _label_first_column(axes, "units switched off since previous\nmeasurement (% of layer)")
    _legend(fig, axes)
    return fig


def _label_first_column(axes: list[Axes], ylabel: str) -> None:
    for ax in axes:
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel(ylabel)


def _lr_exponent(peaks: list[float]) -> int:
    top = pd.Series(peaks, dtype=float).max()  # skips the NaN of runs without a logged LR
    return int(np.floor(np.log10(top))) if top > 0 else 0


def _plot_lr(ax: Axes, train: pd.DataFrame, exponent: int, **style: object) -> None:
    """The LR schedule in units of 10^exponent, named in the axis label (no offset text)."""
    ax.plot(train["step"], train["lr"] / 10.0**exponent, **style)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("learning rate" + (f" ($\\times 10^{{{exponent}}}$)" if exponent else ""))


def _smooth(values: pd.Series) -> pd.Series:
    window = max(1, len(values) // 50)
    return values.rolling(window, min_periods=1, center=True).mean()


def training_figure(runs: list[RunData]) -> Figure | None:
    """Loss (train, smoothed, and validation), validation accuracy and LR over training."""
    present = [rd for rd in runs if not (rd.run.train.empty and rd.run.eval.empty)]
    if not present:
        return None
    fig = Figure(figsize=(SINGLE[0] + (1.2 if len(present) > 1 else 0), 7.2), dpi=DPI,
                 layout="constrained")  # fmt: skip
    loss_ax, acc_ax, lr_ax = fig.subplots(3, 1, sharex=True)
    palette = mpl.colormaps["Dark2"]
    # One LR scale for all runs, so that their schedules compare on one axis.
    exponent = _lr_exponent([rd.run.train["lr"].max() for rd in present if "lr" in rd.run.train])
    for i, rd in enumerate(present):
        color = palette(i % 8)
        name = f"{rd.label}: " if len(present) > 1 else ""
        train, ev = rd.run.train, rd.run.eval
        if "loss" in train and train["loss"].notna().any():
            loss_ax.plot(train["step"], train["loss"], color=color, alpha=0.25, linewidth=0.8)
            loss_ax.plot(train["step"], _smooth(train["loss"]), color=color,
                         label=f"{name}train (smoothed)")  # fmt: skip
        if "val_loss" in ev and ev["val_loss"].notna().any():
            loss_ax.plot(ev["step"], ev["val_loss"], color=color, linestyle="--", marker="o",
                         markersize=3, label=f"{name}validation")  # fmt: skip
        if "val_acc" in ev and ev["val_acc"].notna().any():
            acc_ax.plot(ev["step"], 100 * ev["val_acc"], color=color, marker="o", markersize=3,
                        label=rd.label)  # fmt: skip
        if "lr" in train and train["lr"].notna().any():
            _plot_lr(lr_ax, train, exponent, color=color, label=rd.label)
    loss_ax.set_ylabel("loss (nats / token)")
    acc_ax.set_ylabel("validation next-token\naccuracy (%)")
    lr_ax.set_xlabel(STEP_LABEL)
    lr_ax.xaxis.set_major_formatter(FuncFormatter(_steps))
    for ax in (loss_ax, acc_ax, lr_ax):
        if ax.get_legend_handles_labels()[0] and (ax is loss_ax or len(present) > 1):
            ax.legend(loc="best")
        if not ax.has_data():
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", color="0.5")
    return fig
