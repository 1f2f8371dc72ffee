"""Reports of the Sparsing Law experiments: activation functions over training, width/depth.

Sparsing Law (Luo et al., arXiv 2411.02335): with PPL-p% sparsity, ReLU's activation ratio falls
over training (a logspace power law) while SiLU's rises and converges (a power law); at a fixed
parameter count the activation ratio rises with the width-depth ratio ``d_model / n_layers`` up to
a bottleneck. Both findings are checked on the runs themselves (:func:`trend`,
:func:`check_finding`; :func:`width_depth_bottleneck`); the pages render with the run report's
document model and figure style.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure as MplFigure

from sparsetrace.claims import RULES, Verdict
from sparsetrace.claims.rules import BOTTLENECK_ARMS, bottleneck
from sparsetrace.claims.sparsing import Curve, check_finding, curve_verdict
from sparsetrace.errors import UserError
from sparsetrace.report import experiments as rx
from sparsetrace.report import figures
from sparsetrace.report.document import Section, Table, Text
from sparsetrace.sparsing.laws import (
    MIN_POINTS,
    TOKENS_PER_UNIT,
    Bottleneck,
    fit_bottleneck,
    fit_law,
    law_form,
    run_activation,
    warmup_points,
)
from sparsetrace.sparsing.over_training import ratio_or_nan, replicates_text

RATIO_LABEL = "activation ratio (PPL-p%)"


def _four(v: float) -> str:
    return f"{v:.4f}"


def _general(v: float) -> str:
    return f"{v:.4g}"


def _sci(v: float) -> str:
    return f"{v:.3e}"


def _four_or_blank(v: float) -> str:
    return "" if math.isnan(v) else f"{v:.4f}"


def _whole(v: float) -> str:
    return f"{v:,.0f}"


def fit_curve(
    label: str, form: str, steps: np.ndarray, tokens: np.ndarray, ratio: np.ndarray,
    warmup_steps: int,
) -> Curve:  # fmt: skip
    """A run's curve (one point per checkpoint, ascending) with the Sparsing Law of ``form``
    fitted to the checkpoints after warm-up (the authors' rule); too few points or a curve the
    law cannot fit (e.g. constant): no fit, a note. A checkpoint at step 0 (no training tokens)
    is not on the law's axis: left out."""
    trained = np.asarray(tokens, dtype=float) > 0
    steps, tokens, ratio = steps[trained], tokens[trained], ratio[trained]
    skip = warmup_points(steps, warmup_steps)
    if len(ratio) - skip < MIN_POINTS:
        note = (f"{len(ratio)} checkpoints, {skip} of them during warm-up: fitting needs at "
                f"least {MIN_POINTS} after it")  # fmt: skip
        return Curve(label, form, tokens, ratio, None, note)
    try:
        fit = fit_law(tokens, ratio, form, skip_first=skip)
    except ValueError as err:
        return Curve(label, form, tokens, ratio, None, f"no law fitted: {err}")
    return Curve(label, form, tokens, ratio, fit)


def activation_figure(curves: list[Curve]) -> MplFigure | None:
    """Activation ratio against training tokens (log axis), one colour per run: measured points
    joined by a line, the fitted Sparsing Law dashed."""
    if not curves:
        return None
    with figures.style():
        fig = MplFigure(figsize=figures.SINGLE, dpi=figures.DPI, layout="constrained")
        ax = fig.add_subplot()
        palette = mpl.colormaps["tab10"]
        for i, c in enumerate(curves):
            ax.plot(c.tokens, c.ratio, marker="o", markersize=4, color=palette(i), label=c.label)
            if c.fit is not None:
                grid = np.geomspace(c.tokens.min(), c.tokens.max(), 200)
                with np.errstate(all="ignore"):
                    fitted = c.fit.curve(grid / TOKENS_PER_UNIT)
                ax.plot(grid, fitted, "--", color=palette(i), label=f"{c.label}: {c.form} law")
        ax.set_xscale("log")
        ax.set_xlabel("training tokens")
        ax.set_ylabel(RATIO_LABEL)
        ax.legend(loc="best")
    return fig


def _fit_row(c: Curve) -> dict[str, float | str]:
    law = c.fit
    params = law.params if law else {}
    lo, hi = law.a0_low_high if law else (math.nan, math.nan)
    note = c.note
    if law and law.limit_undetermined:
        note = f"{law.limit_undetermined}: these checkpoints do not determine it"
    return {
        "law": c.form, "checkpoints": float(len(c.ratio)),
        "warm-up points dropped": float(law.skip) if law else math.nan,
        "final activation ratio": float(c.ratio[-1]) if len(c.ratio) else math.nan,
        **{k: params.get(k) if params.get(k) is not None else math.nan
           for k in ("A0", "alpha", "b", "c")},
        "A0 low": lo, "A0 high": hi,
        "MAE": law.mae if law else math.nan, "MSE": law.mse if law else math.nan,
        "log baseline MSE": law.baseline.mse if law and law.baseline else math.nan,
        "finding": curve_verdict(c), "note": note,
    }  # fmt: skip


def write_activations_report(out: Path, curves: list[Curve], p: float) -> Path:
    """Activation ratio vs tokens per activation with the fitted laws, the fit table and the
    ReLU-falls / SiLU-rises finding checked on these runs; returns index.html."""
    report = out / "report"
    finding = check_finding(curves)
    frame = pd.DataFrame({c.label: _fit_row(c) for c in curves}).T
    frame.index.name = "activation"
    table = Table(
        "laws", "Activation ratio and fitted Sparsing Law per activation",
        f"Final activation ratio at PPL-{p:g}% (one CETT per run, chosen on its last "
        "checkpoints), the law fitted to ratio vs D = tokens / 1e9 without the checkpoints "
        "taken during warm-up (the authors' rule) (relu form for relu-like, "
        "silu form for silu/gelu-like activations), A0's 95 % interval (low, high), its "
        "MAE/MSE and the log baseline's MSE; "
        "finding = the run's trend against the paper's direction.",
        frame,
        {"checkpoints": _whole, "warm-up points dropped": _whole,
         "final activation ratio": _four, "A0": _general,
         "A0 low": _general, "A0 high": _general,
         "alpha": _general, "b": _general, "c": _general, "MAE": _sci, "MSE": _sci,
         "log baseline MSE": _sci},
    )  # fmt: skip
    figure = rx.figure_block(
        report / "figures", "activation_ratio", "Activation ratio over training",
        f"Activation ratio at PPL-{p:g}% (mean of layers) against training tokens; dashed: the "
        "fitted Sparsing Law. The paper: ReLU's ratio falls, SiLU's rises and converges.",
        activation_figure(curves),
    )  # fmt: skip
    sections = [
        Section("finding", "Finding: ReLU's activation ratio falls, SiLU's rises", [
            Text(f"Sparsing Law finding on these runs: {finding.outcome} (rule: "
                 f"{RULES['sparsing_direction'].line}).", "note"),
            Text(str(finding)),
        ]),
        Section("figure", "Activation ratio vs training tokens", [figure]),
        Section("laws", "Fitted laws", [table]),
    ]  # fmt: skip
    return rx.write_document(
        report, "Sparsing Law: activation ratio over training by activation function",
        f"PPL-{p:g}% sparsity; runs: {', '.join(c.label for c in curves)}", sections,
    )  # fmt: skip


RATIO = "width-depth ratio"
LIMIT = ["limit A0", "A0 low", "A0 high"]


def width_depth_bottleneck(frame: pd.DataFrame) -> tuple[Bottleneck | None, Verdict]:
    """The two-segment line of the limit A0 over the width-depth ratio through the arms that
    have a limit and its interval, and the rule's verdict (``width_depth_bottleneck``)."""
    arms = frame[[RATIO, *LIMIT]].astype(float)
    arms = arms[np.isfinite(arms).all(axis=1)]
    fit = None
    if len(arms) >= BOTTLENECK_ARMS:
        fit = fit_bottleneck(arms[RATIO], arms["limit A0"], arms[["A0 low", "A0 high"]])
    return fit, bottleneck(fit, len(arms))


def undetermined(frame: pd.DataFrame, column: str) -> pd.Series:
    """Rows whose reason column (``A0 undetermined``, ``L_inf undetermined``) is not empty."""
    return frame[column].fillna("").astype(str) != ""


def lowest_limit_loss(frame: pd.DataFrame) -> str:
    """Where the limit loss is lowest among the arms whose curve determines it
    (``LossFit.limit_undetermined`` empty): at an intermediate ratio or at an end of the range
    (the paper: lowest in a middle range). The arg-min only, not tested against the intervals."""
    arms = frame.sort_values(RATIO)
    known = arms.loc[~undetermined(arms, "L_inf undetermined"), "limit loss"].astype(float).dropna()
    if len(known) < 3:
        return (f"{len(known)} of {len(arms)} arms have a limit loss their curve determines (not "
                "on its bound, its 95 % interval clear of 0): no middle range to "
                "compare.")  # fmt: skip
    best = known.idxmin()
    row, rank = arms.loc[best], list(known.index).index(best)
    if 0 < rank < len(known) - 1:
        where = "an intermediate ratio (arms on both sides reach a higher limit loss)"
    else:
        where = ("the deepest, narrowest of these arms" if rank == 0
                 else "the widest, shallowest of these arms")  # fmt: skip
    return (
        f"Of the {len(known)} arms whose limit loss is determined (not on its bound, its 95 % "
        f"interval clear of 0), it is lowest at width-depth "
        f"ratio {row[RATIO]:.3g} ({best}: L_inf = {row['limit loss']:.4f}, 95 % interval "
        f"{row['L_inf low']:.4f}–{row['L_inf high']:.4f}): {where}. The paper finds the lowest "
        "limit loss in a middle range of ratios; this is the arm with the lowest estimate, not a "
        "test against the intervals."
    )


def _limits(ax: Axes, r: np.ndarray, rows: pd.DataFrame, columns: list[str], label: str) -> None:
    """Limits with their 95 % intervals as error bars: black where the curve determines them,
    grey where it does not (``columns``: value, low, high, the reason column)."""
    value, low, high = (rows[c].to_numpy(float) for c in columns[:3])
    vague = undetermined(rows, columns[3]).to_numpy()
    for keep, color, text in ((~vague, "black", label), (vague, "0.6", "undetermined")):
        if keep.any():
            ax.errorbar(r[keep], value[keep], yerr=[value[keep] - low[keep],
                        high[keep] - value[keep]], fmt="o", color=color, capsize=3,
                        label=text)  # fmt: skip


def width_depth_figure(frame: pd.DataFrame, fit: Bottleneck | None) -> MplFigure | None:
    """Top: the limit A0 (bars: its 95 % interval; grey: undetermined) and the final activation
    ratio (hollow) against the width-depth ratio (log axis), with the fitted two-segment line
    and r* (band: its bootstrap interval). Bottom: the limit loss (bars: its 95 % interval) and
    the final training loss (hollow)."""
    if frame.empty:
        return None
    rows = frame.sort_values(RATIO)
    r = rows[RATIO].to_numpy(float)
    with figures.style():
        fig = MplFigure(figsize=(figures.SINGLE[0], 6.5), dpi=figures.DPI, layout="constrained")
        ratio_ax, loss_ax = fig.subplots(2, 1, sharex=True)
        _limits(ratio_ax, r, rows, [*LIMIT, "A0 undetermined"], "limit A0 (95 % interval)")
        ratio_ax.plot(r, rows["final activation ratio"], "o", mfc="none", color="tab:blue",
                      label="final checkpoint")  # fmt: skip
        for x, y, d, n in zip(r, rows["final activation ratio"], rows["d_model"],
                              rows["n_layers"], strict=True):  # fmt: skip
            ratio_ax.annotate(f"{d:.0f}×{n:.0f}", (x, y), textcoords="offset points",
                              xytext=(4, 4), fontsize=8)  # fmt: skip
        if fit is not None:
            grid = np.geomspace(r.min(), r.max(), 200)
            ratio_ax.plot(grid, fit.curve(grid), "--", color="tab:red",
                          label="two-segment fit")  # fmt: skip
            ratio_ax.axvline(fit.r_star, color="tab:red", lw=1)
            ratio_ax.axvspan(*fit.intervals["r_star"], color="tab:red", alpha=0.12,
                             label=f"r* = {fit.r_star:.3g} (95 % interval)")  # fmt: skip
        ratio_ax.set_ylabel(RATIO_LABEL)
        ratio_ax.legend(loc="best", fontsize=8)
        _limits(loss_ax, r, rows, ["limit loss", "L_inf low", "L_inf high", "L_inf undetermined"],
                "limit loss L_inf (95 % interval)")  # fmt: skip
        loss_ax.plot(r, rows["train loss (last 5 %)"], "o", mfc="none", color="tab:blue",
                     label="training loss, last 5 % of steps")  # fmt: skip
        loss_ax.set_xscale("log")
        loss_ax.set_xlabel("width-depth ratio (d_model / n_layers)")
        loss_ax.set_ylabel("training loss (nats)")
        loss_ax.legend(loc="best", fontsize=8)
    return fig


def write_width_depth_report(
    out: Path, frame: pd.DataFrame, budget: int, p: float, form: str
) -> Path:
    """The limit activation ratio vs the width-depth ratio at a fixed parameter budget: the
    bottleneck rule's verdict, r*, where the limit loss is lowest, the figure and the table
    (``frame``: one row per arm as :func:`sparsetrace.experiments.width_depth.arm_row` builds
    it); returns index.html."""
    report = out / "report"
    fit, verdict = width_depth_bottleneck(frame)
    table = Table(
        "width_depth", "Arms: shape, activation ratio and loss, final and limit",
        f"Gated MLP, d_ff = 2.5 d_model, head dimension fixed; layers chosen to keep the "
        f"non-embedding parameters near the budget of {budget:,}. Activation ratio at PPL-{p:g}% "
        "(mean of layers; one CETT per arm, chosen on its last checkpoints) at the final "
        f"checkpoint, and the limit A0 of the {form} law fitted over the checkpoints with its 95 % "
        "interval ('A0 undetermined': why the curve does not determine the limit — on its bound "
        "beyond the data, no interval, an interval spanning its whole physical range, or no fit; "
        "a limit on the bound at the data is a flattened curve, determined). Limit loss: L_inf of "
        "L(D) = L_inf + B·D^-beta fitted to the training loss per step after warm-up, with its "
        "95 % interval (± 1.96 SE; 'L_inf undetermined': on its bound — 0 or the lowest "
        "observed loss — or an interval reaching 0).",
        frame,
        {"d_model": _whole, "n_layers": _whole, "n_heads": _whole, "d_ff": _whole,
         "parameters": _whole, RATIO: lambda v: f"{v:.1f}", "checkpoints": _whole,
         "final activation ratio": _four, "limit A0": _four, "A0 low": _four, "A0 high": _four,
         "val loss": _four,
         "train loss (last 5 %)": _four, "limit loss": _four, "L_inf low": _four,
         "L_inf high": _four},
    )  # fmt: skip
    figure = rx.figure_block(
        report / "figures", "width_depth", "Limit activation ratio and loss vs width-depth ratio",
        "Each point one arm (d_model × n_layers) at the same parameter budget; log axis (the "
        "fitted line is linear in the ratio). Top: limit A0 with its 95 % interval, final "
        "checkpoint hollow, the two-segment fit and the bottleneck r* with its bootstrap "
        "interval; grey: a limit its curve does not determine. Bottom: limit loss and final "
        "training loss. The paper: the activation ratio rises linearly with the width-depth "
        "ratio up to a bottleneck, then stops; the limit loss is lowest in a middle range.",
        width_depth_figure(frame, fit),
    )  # fmt: skip
    where = "No bottleneck fitted (too few arms with a limit)."
    if fit:
        low, high = fit.intervals["r_star"]
        where = (f"Bottleneck r* = {fit.r_star:.4g} (95 % bootstrap interval {low:.4g}–{high:.4g}) "
                 f"from {fit.points} arms.")  # fmt: skip
    blocks = [
        Text(f"Sparsing Law on these arms: {verdict.outcome} (rule: "
             f"{RULES['width_depth_bottleneck'].line}).", "note"),
        Text(str(verdict)), Text(where), Text(lowest_limit_loss(frame)),
    ]  # fmt: skip
    for column, what in (("A0 undetermined", "limit A0"), ("L_inf undetermined", "limit loss")):
        arms = [f"{a} ({frame.loc[a, column]})" for a in frame.index[undetermined(frame, column)]]
        if arms:
            blocks.append(Text(f"The curve does not determine the {what} in {len(arms)} of "
                               f"{len(frame)} arms: {'; '.join(arms)}.", "warning"))  # fmt: skip
    sections = [
        Section("finding", "Finding: the limit activation ratio rises up to a bottleneck", blocks),
        Section("figure", "Limit activation ratio and loss vs width-depth ratio", [figure]),
        Section("table", "Arms", [table]),
    ]
    return rx.write_document(
        report, "Sparsing Law: limit activation ratio by width-depth ratio",
        f"{len(frame)} arms at {budget:,} non-embedding parameters; PPL-{p:g}% sparsity; "
        f"{form} law over each arm's checkpoints",
        sections,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# The run report's Sparsing Law section


def _pct(v: float) -> str:
    return f"{100 * v:.2f}"


def run_section(runs: list, fig_dir: Path) -> Section | None:
    """PPL-p% sparsity of each run that has ``sparsing_law.json`` (``sparsetrace run`` and
    ``sparsetrace sparsing-law RUN`` measure every checkpoint): per layer the CETT
    threshold, the activation ratio and the dead units; the over-training curve and its law fit
    when there are enough checkpoints, drawn in figures/ (``fig_dir``); the comparison with the
    baselines when ``sparsetrace sparsing-baselines`` measured it. None when no run has either
    file."""
    blocks: list = []
    curves: list[Curve] = []
    ps: set[float] = set()
    for rd in runs:
        path = rd.run.path / "sparsing_law.json"
        if path.is_file():
            summary = json.loads(path.read_text())
            ps.add(summary["p"])
            run_blocks, curve = _run_blocks(rd, summary)
            blocks += run_blocks
            curves += [curve] if curve is not None else []
        compared = rd.run.path / "sparsing_baselines.json"
        if compared.is_file():
            summary = json.loads(compared.read_text())
            ps.add(summary["p"])
            blocks.append(baselines_table(rd.label, summary))
    if not blocks:
        return None
    if curves:
        blocks.append(rx.figure_block(
            fig_dir, "sparsing_law_over_training", "Activation ratio over training",
            "Activation ratio at PPL-p% (mean of layers) against training tokens, one c per "
            "run; dashed: the Sparsing Law fitted after warm-up.", activation_figure(curves),
        ))  # fmt: skip
    intro = Text(
        "Sparsing Law (Luo et al., arXiv 2411.02335): PPL-p% sparsity counts the units whose "
        "contribution matters at a perplexity cost of p %, for any activation function "
        "(docs/sparsing-law.md). `sparsetrace run` measures every checkpoint at the c found on "
        "the final one; `sparsetrace sparsing-law RUN` finds c on the last 5 (the public "
        "scripts' choice). The law is fitted over training without the checkpoints taken "
        "during warm-up (the authors' rule). `sparsetrace sparsing-baselines RUN` adds the "
        "comparison with Top-k and FAT-ε at the same perplexity."
    )
    title = "Sparsing Law: " + ", ".join(f"PPL-{p:g}%" for p in sorted(ps)) + " sparsity"
    return Section("sparsing-law", title, [intro, *blocks])


def _hidden_units(rd, layer: int) -> float:
    """A layer's units from the run's sparsity rows (summaries written before they recorded
    them); NaN when the run has none."""
    if rd.series.empty:
        return math.nan
    last = rd.series[rd.series["step"] == rd.series["step"].max()].set_index("layer")
    return last["hidden"].get(layer, math.nan)


def _run_blocks(rd, summary: dict) -> tuple[list, Curve | None]:
    """One run's ``sparsing_law.json``: the final checkpoint's text and per-layer table, then the
    over-training table, its fit and its curve."""
    blocks: list = []
    final = summary["checkpoints"][-1]
    rows, dead, units = {}, 0, 0.0
    for layer, v in final["layers"].items():
        hidden = v["units"] if "units" in v else _hidden_units(rd, int(layer))
        dead, units = dead + v["dead_units"], units + hidden
        rows[f"layer {layer}"] = {
            "CETT threshold τ": v["tau"], "activation ratio %": 100 * v["activation_ratio"],
            "at τ in the dense model %": 100 * v["activation_ratio_dense"],
            "dead units %": 100 * v["dead_units"] / hidden,
        }  # fmt: skip
    rows["mean of layers"] = {
        "CETT threshold τ": math.nan, "activation ratio %": 100 * final["activation_ratio"],
        "at τ in the dense model %": math.nan, "dead units %": 100 * dead / units,
    }  # fmt: skip
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "layer"
    p = summary["p"]
    blocks.append(Text(
        f"{rd.label}, step {final['step']}: CETT c = {summary['cett']:.4g}, chosen so "
        f"that perplexity rises by {p:g} % (measured ratio {final['ppl_ratio']:.4f}, target "
        f"{summary['target_ppl_ratio']:.4f}) on {summary['tokens_evaluated']:,} validation "
        f"tokens. Activation ratio at PPL-{p:g}%: {100 * final['activation_ratio']:.2f} % "
        f"{uncertainty_text(summary, final)} Nonzero activations of the untruncated model: "
        f"{100 * final['dense_activation_ratio']:.2f} %. Dead: active on < 0.1 % of the "
        "tokens."
    ))  # fmt: skip
    if "replicates" in summary:
        blocks.append(Text(f"{rd.label}: {replicates_text(summary)}"))
    blocks.append(Table(
        f"sparsing_law_{rd.label}", f"PPL-{p:g}% sparsity per layer ({rd.label})",
        "The threshold τ keeps each layer's CETT (the relative error of dropping the units "
        "below τ) at c. The activation ratio is measured with every layer truncated at once "
        "(a layer's input then changes with the layers below it); 'at τ in the dense model' "
        "is the same threshold applied to the untruncated model's activations.",
        frame, formats={c: (_general if c.startswith("CETT") else _four) for c in frame},
    ))  # fmt: skip
    curve_blocks, curve = _over_training_blocks(rd.label, summary, rd.run)
    return blocks + curve_blocks, curve


def baselines_table(label: str, summary: dict) -> Table:
    """A ``sparsing_baselines.json``: each method's parameter, activation ratio, SEs and PPL
    ratio, and each baseline's paired difference from PPL-p%."""
    from sparsetrace.sparsing.comparison import METHOD_NAMES

    p = summary["p"]
    differences = {(d["method"], d["definition"]): d for d in summary["differences"]}
    rows = {}
    for m in summary["methods"]:
        name = METHOD_NAMES[m["method"]].format(p=p)
        d = differences.get((m["method"], m["definition"]), {})
        lo, hi = m["interval_95"]
        rows[f"{name} {m['definition']}".strip()] = {
            "parameter": f"{m['parameter']} = {m['value']:.4g} ({lo:.4g}-{hi:.4g})",
            "activation ratio %": 100 * m["activation_ratio"],
            "± SE with search": 100 * m["se_search"], "PPL ratio": m["ppl_ratio"],
            f"minus PPL-{p:g}% (points)": 100 * d.get("minus_cett", math.nan),
            "± paired SE": 100 * d.get("se", math.nan),
            "resamples clipped %": 100 * m["clipped"],
        }  # fmt: skip
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "method"
    return Table(
        f"sparsing_baselines_{label}", f"PPL-{p:g}% sparsity and its baselines ({label})",
        f"Step {summary['step']}, every method matched to PPL ratio "
        f"{summary['target_ppl_ratio']:.4f} on {summary['tokens_evaluated']:,} validation tokens "
        "(`sparsetrace sparsing-baselines`). The paper: at the same PPL, PPL-p% sparsity keeps "
        "the fewest units. The parameter's 95 % interval and the SEs: bootstrap over sequences "
        "with each method's search redone on every resample (clipped: resamples that did not "
        "reach the target within the evaluated parameters; their SE is then a lower bound); the "
        "difference's SE is paired (the same resamples for all methods). "
        "reference: the public code's baselines (on act(gate), Top-k over the batch); ours: on "
        "the product act(gate) * up, Top-k per token.",
        frame,
        formats={
            "activation ratio %": _four, "± SE with search": _four_or_blank,
            "PPL ratio": lambda v: f"{v:.5f}", f"minus PPL-{p:g}% (points)": _signed,
            "± paired SE": _four_or_blank, "resamples clipped %": lambda v: f"{v:.1f}",
        },
    )  # fmt: skip


def _or_nan(v: float | None) -> float:
    return math.nan if v is None else v


def _signed(v: float) -> str:
    return "" if math.isnan(v) else f"{v:+.4f}"


def uncertainty_text(summary: dict, final: dict) -> str:
    """The activation ratio's uncertainty at a checkpoint of a ``sparsing_law.json`` summary: the
    SE at fixed c, and the SE with the search for c included where it was measured."""
    ratio, se = final["activation_ratio"], final["activation_ratio_se"]
    fixed = (f"± {100 * se:.2f} (bootstrap SE over sequences with c held fixed; "
             f"{ratio_or_nan(se, ratio):.1%} relative).")  # fmt: skip
    se_search = final.get("activation_ratio_se_search")  # absent in files of older versions
    if se_search is None or not math.isfinite(se_search):
        return (
            fixed + " c is searched on the same tokens, so the whole measurement varies "
            "more from one token set to another (`sparsetrace sparsing-law RUN` measures it)."
        )
    lo, hi = summary["search"]["c_interval_95"]
    clipped = summary["search"].get("clipped", 0.0)
    return (
        f"{fixed} With the search for c redone on every resample: ± {100 * se_search:.2f} "
        f"({ratio_or_nan(se_search, ratio):.1%} relative; c 95 % interval {lo:.3g}-{hi:.3g}"
        + (f"; {clipped:.1%} of resamples outside the evaluated c" if clipped else "")
        + "). On the `cpu` model the spread over disjoint random token sets was about 2/3 of "
        "this SE: it errs on the safe side (results/sparsing-law-token-spread-cpu.md; "
        "`--replicates K` measures that spread for this run)."
    )


def _over_training_blocks(label: str, summary: dict, run) -> tuple[list, Curve | None]:
    """The over-training table and its law fit's sentence; the curve (None: fewer than two
    checkpoints, or an activation without a Sparsing Law form)."""
    points = summary["checkpoints"]
    if len(points) < 2:
        return [Text(f"{label}: one checkpoint measured, no over-training curve (`sparsetrace "
                     "sparsing-law RUN` measures them all).", "note")], None  # fmt: skip
    # Tokens per step unknown (a Hugging Face series): the curve and its fit over steps; the
    # law's A0 and alpha do not depend on the unit.
    by_step = summary.get("x", "tokens") == "steps"
    frame = pd.DataFrame(
        {"tokens": [c["step"] if by_step else c["tokens"] for c in points],
         "activation ratio %": [100 * c["activation_ratio"] for c in points],
         "± SE at c": [100 * c["activation_ratio_se"] for c in points],
         "± SE with search": [100 * _or_nan(c.get("activation_ratio_se_search"))
                              for c in points]},
        index=pd.Index([c["step"] for c in points], name="step"),
    )  # fmt: skip
    formats = {"tokens": _whole, "activation ratio %": _four, "± SE at c": _four,
               "± SE with search": _four_or_blank}  # fmt: skip
    unit = ("The tokens per step are unknown: the 'tokens' column holds the step, and the law "
            "is fitted over steps. " if by_step else "")  # fmt: skip
    out: list = [Table(f"sparsing_law_curve_{label}", f"Activation ratio over training ({label})",
                       unit + "One CETT c for all checkpoints, found on the final ones. ± SE at c: "
                       "bootstrap over the evaluation sequences at that c, the spread between "
                       "checkpoints; ± SE with search: the search for c redone on each resample "
                       "(the checkpoints c was searched on), the uncertainty of a ratio on its "
                       "own.", frame, formats=formats)]  # fmt: skip
    activation = run_activation(run.path) or ""
    try:
        form = law_form(activation)
    except UserError as err:
        out.append(Text(f"{label}: no law fitted ({err}).", "note"))
        return out, None
    curve = fit_curve(label, form, frame.index.to_numpy(), frame["tokens"].to_numpy(float),
                      frame["activation ratio %"].to_numpy() / 100,
                      int((run.config.get("train") or {}).get("warmup_steps", 0)))  # fmt: skip
    fit = curve.fit
    if fit is None:
        out.append(Text(f"{label}: {curve.note}.", "note"))
        return out, curve
    lo, hi = fit.a0_low_high
    dropped = f" (the {fit.skip} taken during warm-up left out)" if fit.skip else ""
    out.append(Text(f"{label}: {fit.form} law fitted to {len(points) - fit.skip} checkpoints"
                    f"{dropped}: limit A0 = {100 * fit.limit:.2f} % (95 % interval "
                    f"{100 * lo:.2f}–{100 * hi:.2f} %), MSE {fit.mse:.2e}; the log baseline's "
                    f"MSE {fit.baseline.mse:.2e}."))  # fmt: skip
    if fit.limit_undetermined:
        out.append(Text(f"{label}: {fit.limit_undetermined} — the curve does not determine the "
                        "limit yet (more or later checkpoints would).", "warning"))  # fmt: skip
    return out, curve
