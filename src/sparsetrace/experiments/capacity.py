"""Capacity round 2 (paper 4.4, Table 4): is per-batch sparsity the capacity a layer can use?

Round 1 trains the preset. Round 2 trains from scratch with each layer's MLP exactly as wide as
the number of units round 1 used per batch at the end (its last measured step). If the unused
units were capacity the model could not use, round 2 would use (nearly) all of its units and
train as well. The paper found the opposite: round 2 used a similar per-layer fraction of its
smaller width as round 1 did of 32768, and trained to a substantially worse loss.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from sparsetrace.config import load_config
from sparsetrace.errors import UserError
from sparsetrace.experiments.runs import (
    arm_config,
    base_overrides,
    default_out,
    open_experiment,
    run_to_end,
)
from sparsetrace.report import experiments as rx
from sparsetrace.report import paper as published
from sparsetrace.report import write_report as write_runs_report
from sparsetrace.report.analysis import prepare
from sparsetrace.report.document import Section, Table, Verdict
from sparsetrace.report.findings import NOT_SHOWN, PARTLY, YES
from sparsetrace.rundir import load_run

SIMILAR_POINTS = 10.0  # "a similar per-layer fraction": within this many percentage points


def final_use(run: Path) -> pd.DataFrame:
    """Per layer: width (hidden) and units used per batch (per_batch) at the last step at which
    every layer was measured."""
    rd = prepare(load_run(run), run.name)
    if rd.end_step is None:
        raise UserError(f"{run}: no sparsity measurement (trace.every 0?); round 2 needs round 1's")
    end = rd.series[rd.series["step"] == rd.end_step].set_index("layer").sort_index()
    return end[["hidden", "per_batch"]].astype(float)


def round2_widths(run: Path) -> list[int]:
    """Round 1's per-batch use per layer at its last measured step, rounded, at least 1."""
    return [max(1, round(v)) for v in final_use(run)["per_batch"]]


def run_capacity_experiment(
    preset: str, quick: bool, out: Path | None, overrides: list[str] | None
) -> Path:
    """Train (or finish) both rounds, then write the report; returns its index."""
    shared = base_overrides(quick, overrides)
    base = load_config(preset, shared)
    if base.trace.every == 0:
        raise UserError("the capacity experiment needs tracing: trace.every must be positive")
    out = Path(out) if out else default_out(base, "capacity", preset, quick)
    open_experiment(out, {"experiment": "capacity", "preset": preset, "overrides": shared})
    round1 = run_to_end(arm_config(preset, shared, out, "round1"))
    widths = ["--model.d_ff_per_layer", json.dumps(round2_widths(round1))]
    round2 = run_to_end(arm_config(preset, [*shared, *widths], out, "round2"))
    return write_report(out, round1, round2)


def _table4(round1: Path, round2: Path) -> pd.DataFrame:
    groups = {}
    for label, run in (("round 1", round1), ("round 2", round2)):
        use = final_use(run)
        groups[label] = pd.DataFrame({
            "width": use["hidden"], "used": use["per_batch"],
            "used (%)": 100 * use["per_batch"] / use["hidden"],
        })  # fmt: skip
    paper = pd.DataFrame.from_dict(
        published.TABLE4, orient="index", columns=["round 1 used", "round 2 used", "round 1 (%)",
                                            "round 2 (%)"],
    )  # fmt: skip
    groups["paper (Table 4)"] = paper
    frame = pd.concat(groups, axis=1)
    frame.index.name = "layer"
    return frame


def _claims(table4: pd.DataFrame, scores: pd.DataFrame) -> Table:
    gap = (table4[("round 2", "used (%)")] - table4[("round 1", "used (%)")]).abs()
    similar = Verdict(
        YES if gap.max() <= SIMILAR_POINTS else PARTLY if gap.mean() <= SIMILAR_POINTS
        else NOT_SHOWN,
        f"per-layer |round 2 − round 1| use: mean {gap.mean():.1f}, largest {gap.max():.1f} "
        f"percentage points (yes: all within {SIMILAR_POINTS:g}; partly: on average)",
    )  # fmt: skip
    dl = scores.loc["round 2", "val loss"] - scores.loc["round 1", "val loss"]
    worse = Verdict(
        YES if dl > 0 else NOT_SHOWN,
        f"final val loss {dl:+.4f} nats in round 2 (one seed per round: no test of significance)",
    )
    frame = pd.DataFrame.from_dict({
        "round 2 uses a similar per-layer fraction of its width as round 1": {
            "paper": "yes (Table 4)", "this run": similar},
        "round 2 trains to a worse loss": {"paper": "substantially worse", "this run": worse},
    }, orient="index")  # fmt: skip
    frame.index.name = "claim (§4.4)"
    return Table("capacity_claims", "The paper's claims checked on this run",
                 "Verdicts: yes / partly / not shown.", frame)  # fmt: skip


def write_report(out: Path, round1: Path, round2: Path) -> Path:
    """Table 4, both rounds' losses, the claims, and the two rounds' full run report."""
    report = out / "report"
    table4 = _table4(round1, round2)
    rounds = {label: prepare(load_run(p), label) for label, p in (("round 1", round1),
                                                                  ("round 2", round2))}  # fmt: skip
    scores = pd.DataFrame({label: rx.run_scores(rd) for label, rd in rounds.items()}).T
    scores.index.name = "round"
    pct = {
        "round 1": table4["round 1"][["used (%)"]], "round 2": table4["round 2"][["used (%)"]],
        "paper round 1": table4["paper (Table 4)"][["round 1 (%)"]].set_axis(["used (%)"], axis=1),
        "paper round 2": table4["paper (Table 4)"][["round 2 (%)"]].set_axis(["used (%)"], axis=1),
    }  # fmt: skip
    figure = rx.figure_block(
        report / "figures", "capacity_use", "Units used per batch, % of the layer's width",
        "Round 1 of its preset width, round 2 of round 1's per-batch use; the paper's Table 4.",
        rx.use_by_layer_figure(pct, {"used (%)": "units used per batch (% of width)"}, "round"),
    )  # fmt: skip
    runs_index = write_runs_report([round1, round2], report / "runs")
    fmt = {c: (lambda v: f"{v:.1f}") for c in ("used (%)", "round 1 (%)", "round 2 (%)")}
    fmt.update({c: (lambda v: f"{v:.0f}") for c in ("width", "used", "round 1 used",
                                                     "round 2 used")})  # fmt: skip
    sections = [
        Section("claims", "The paper's claims", [_claims(table4, scores)]),
        Section("table4", "Table 4 — units used, round 1 and round 2", [Table(
            "table4", "Table 4: hidden units used per batch at the end of training",
            "Units used in the device batch of the last measured step; round 2's width per "
            "layer = round 1's used units (rounded, at least 1); % of the round's width. The "
            "paper's round 1 had 32768 units per layer and 16 × 512 tokens per batch.",
            table4, fmt, shaded="paper (Table 4)",
        ), figure]),
        Section("scores", "Both rounds' final loss", [rx.scores_table("capacity_scores", scores)]),
        rx.runs_link_section("Both rounds in full", runs_index, report),
    ]  # fmt: skip
    return rx.write_document(
        report,
        "Capacity round 2 (Wild & Anderson §4.4, Table 4)",
        f"Round 1: {round1}; round 2 (widths = round 1's per-batch use): {round2}.",
        sections,
    )
