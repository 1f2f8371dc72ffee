"""Reports of the experiments (masking, capacity round 2, sensitivity sweeps): their figures and
one writer for a report built of document sections (the paper's numbers: paper.py).

The sections are built next to the analysis in :mod:`sparsetrace.experiments`; they render with
the run report's own document model (:mod:`sparsetrace.report.document`) and figure style.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from pathlib import Path

import matplotlib as mpl
import pandas as pd
from matplotlib.figure import Figure as MplFigure

from sparsetrace import __version__
from sparsetrace.report import figures
from sparsetrace.report.document import (
    Figure,
    Section,
    Table,
    Text,
    render_html,
    render_markdown,
    write_csv,
)
from sparsetrace.report.rundata import RunData


def write_document(out_dir: Path, title: str, subtitle: str, sections: list[Section]) -> Path:
    """index.html, report.md and tables/KEY.csv of ``sections``; returns index.html."""
    table_dir = out_dir / "tables"
    table_dir.mkdir(parents=True, exist_ok=True)
    for section in sections:
        for block in section.blocks:
            if isinstance(block, Table):
                write_csv(block, table_dir / f"{block.key}.csv")
    footer = f"Generated {dt.datetime.now().isoformat(timespec='seconds')} by sparsetrace " + (
        f"{__version__} from {out_dir.parent}"
    )
    (out_dir / "report.md").write_text(render_markdown(title, subtitle, sections, footer))
    index = out_dir / "index.html"
    index.write_text(render_html(title, subtitle, sections, footer))
    return index


def run_scores(rd: RunData) -> dict[str, float]:
    """A run's size and end-of-training scores, for tables comparing runs."""
    model, ev, tr = rd.run.meta.get("model", {}), rd.run.eval, rd.run.train
    tail = tr["loss"].tail(max(1, len(tr) // 20))  # the last 5 % of steps: one step is noisy
    return {
        "total width": float(sum(model.get("d_ff", []))),
        "parameters": float(model.get("n_params", math.nan)),
        "train loss (last 5 %)": float(tail.mean()),
        "val loss": float(ev["val_loss"].iloc[-1]) if len(ev) else math.nan,
        "val acc (%)": 100 * float(ev["val_acc"].iloc[-1]) if len(ev) else math.nan,
    }


def runs_link_section(title: str, runs_index: Path, report: Path) -> Section:
    """A section pointing at the multi-run report of every run behind an experiment."""
    text = "Tables 1-3, findings and training curves of every run side by side: "
    return Section("runs", title, [Text(f"{text}{runs_index.relative_to(report)}")])


def scores_table(key: str, scores: pd.DataFrame) -> Table:
    """:func:`run_scores` of several runs (one row each)."""
    return Table(
        key, "Final loss and accuracy",
        "Validation loss and next-token accuracy at the last evaluation; training loss averaged "
        "over the last 5 % of steps.", scores,
        {"total width": lambda v: f"{v:.0f}", "parameters": lambda v: f"{v:,.0f}",
         "train loss (last 5 %)": lambda v: f"{v:.4f}", "val loss": lambda v: f"{v:.4f}",
         "val acc (%)": lambda v: f"{v:.2f}"},
    )  # fmt: skip


def figure_block(
    directory: Path, key: str, title: str, caption: str, fig: MplFigure | None
) -> Figure | Text:
    """Save ``fig`` as figures/KEY.{png,svg} and return its block (a note when there is none)."""
    if fig is None:
        return Text(f"{title}: no data yet.", "note")
    directory.mkdir(parents=True, exist_ok=True)
    with figures.style():
        figures.save(fig, directory, key)
    return Figure(key, title, caption)


def arm_curves_figure(curves: pd.DataFrame, mark_step: int | None = None) -> MplFigure | None:
    """Validation loss and accuracy over training per arm: mean over seeds, band = ± 1 std.

    ``curves`` has columns arm, seed, step, val_loss, val_acc; ``mark_step`` draws a vertical
    line (the masking step).
    """
    if curves.empty:
        return None
    with figures.style():
        fig = MplFigure(figsize=(figures.SINGLE[0], 6.0), dpi=figures.DPI, layout="constrained")
        loss_ax, acc_ax = fig.subplots(2, 1, sharex=True)
        palette = mpl.colormaps["Dark2"]
        dashes = ("-", "--", "-.", ":")  # arms that coincide (dead, pruned) stay visible
        for i, (arm, group) in enumerate(curves.groupby("arm", sort=False)):
            stats = group.groupby("step")[["val_loss", "val_acc"]].agg(["mean", "std"])
            steps = stats.index.to_numpy()
            for ax, col, scale in ((loss_ax, "val_loss", 1.0), (acc_ax, "val_acc", 100.0)):
                mean = stats[(col, "mean")] * scale
                std = stats[(col, "std")].fillna(0.0) * scale
                ax.plot(steps, mean, color=palette(i), linestyle=dashes[i % len(dashes)],
                        marker="o", markersize=3, label=arm)  # fmt: skip
                ax.fill_between(steps, mean - std, mean + std, color=palette(i), alpha=0.2)
        for ax in (loss_ax, acc_ax):
            if mark_step:
                ax.axvline(mark_step, color="0.45", linestyle=":", linewidth=1.2)
        loss_ax.set_ylabel("validation loss (nats / token)")
        acc_ax.set_ylabel("validation next-token\naccuracy (%)")
        acc_ax.set_xlabel(figures.STEP_LABEL)
        loss_ax.legend(loc="best")
    return fig


def use_by_layer_figure(
    tables: Mapping[str, pd.DataFrame], columns: Mapping[str, str], legend_title: str
) -> MplFigure | None:
    """One panel per column of ``columns`` (name -> y label): its value (percent) per layer,
    one line per entry of ``tables`` (label -> frame indexed by layer)."""
    present = {k: t for k, t in tables.items() if not t.empty}
    if not present:
        return None
    with figures.style():
        n = len(columns)
        fig = MplFigure(figsize=(figures.PANEL[0] * n + 1.6, figures.PANEL[1] + 0.4),
                        dpi=figures.DPI, layout="constrained")  # fmt: skip
        axes = fig.subplots(1, n, squeeze=False).ravel()
        cmap = mpl.colormaps["viridis"]
        for ax, (col, ylabel) in zip(axes, columns.items(), strict=True):
            for i, (label, table) in enumerate(present.items()):
                color = cmap(0.9 * i / max(len(present) - 1, 1))
                ax.plot(table.index, table[col], marker="o", markersize=4, color=color, label=label)
            ax.set_xlabel("layer")
            ax.set_ylabel(ylabel)
            ax.set_ylim(0, 105)
            ax.xaxis.get_major_locator().set_params(integer=True)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right upper", title=legend_title)
    return fig
