"""Capacity round 2 (paper 4.4, Table 4): is per-batch sparsity the capacity a layer can use?

Round 1 trains the preset. Round 2 trains from scratch with each layer's MLP exactly as wide as
the number of units round 1 used per batch at the end (its last measured step; the mean over
round 1's seeds). If the unused units were capacity the model could not use, round 2 would use
(nearly) all of its units and train as well. The paper found the opposite: round 2 used a similar
per-layer fraction of its smaller width as round 1 did of 32768, and trained to a substantially
worse loss. Each round runs ``seeds`` seeds, so that both claims can be decided
(:mod:`sparsetrace.claims`): one seed per round leaves "worse" inconclusive.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from sparsetrace import paper as published
from sparsetrace.claims import RULES, Verdict
from sparsetrace.claims import rules as r
from sparsetrace.claims.stats import Estimate, binomial_se_pct, welch
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
from sparsetrace.report import write_report as write_runs_report
from sparsetrace.report.document import Section, Table
from sparsetrace.report.rundata import prepare
from sparsetrace.rundir import load_run


def final_use(run: Path) -> pd.DataFrame:
    """Per layer: width (hidden) and units used per batch (per_batch) at the last step at which
    every layer was measured."""
    rd = prepare(load_run(run), run.name)
    if rd.end_step is None:
        raise UserError(f"{run}: no sparsity measurement (trace.every 0?); round 2 needs round 1's")
    end = rd.series[rd.series["step"] == rd.end_step].set_index("layer").sort_index()
    return end[["hidden", "per_batch"]].astype(float)


def round2_widths(round1: list[Path]) -> list[int]:
    """Round 1's per-batch use per layer at its last measured step, the mean over its seeds,
    rounded, at least 1."""
    use = np.mean([final_use(run)["per_batch"].to_numpy() for run in round1], axis=0)
    return [max(1, round(float(v))) for v in use]


def run_capacity_experiment(
    preset: str, seeds: int, quick: bool, out: Path | None, overrides: list[str] | None
) -> Path:
    """Train (or finish) both rounds for every seed, then write the report; returns its index."""
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}")
    shared = base_overrides(quick, overrides)
    base = load_config(preset, shared)
    if base.trace.every == 0:
        raise UserError("the capacity experiment needs tracing: trace.every must be positive")
    out = Path(out) if out else default_out(base, "capacity", preset, quick)
    open_experiment(out, {"experiment": "capacity", "preset": preset, "overrides": shared,
                          "seeds": seeds})  # fmt: skip
    first = base.train.seed
    round1 = [
        run_to_end(arm_config(preset, [*shared, "--train.seed", str(s)], out, f"round1-seed{s}"))
        for s in range(first, first + seeds)
    ]
    widths = ["--model.d_ff_per_layer", json.dumps(round2_widths(round1))]
    round2 = [
        run_to_end(
            arm_config(preset, [*shared, *widths, "--train.seed", str(s)], out, f"round2-seed{s}")
        )
        for s in range(first, first + seeds)
    ]
    return write_report(out, round1, round2)


def _use(runs: list[Path]) -> pd.DataFrame:
    """Per layer, mean over seeds: width, used units and used % at the last measured step, and
    the standard error of used % (over seeds; one seed: binomial)."""
    uses = [final_use(run) for run in runs]
    pct = pd.DataFrame({i: 100 * u["per_batch"] / u["hidden"] for i, u in enumerate(uses)})
    width = uses[0]["hidden"]
    mean = pct.mean(axis=1)
    if len(runs) >= 2:
        se = pct.std(axis=1, ddof=1) / np.sqrt(len(runs))
    else:
        se = pd.Series([binomial_se_pct(v, int(w)) for v, w in zip(mean, width, strict=True)],
                       index=mean.index)  # fmt: skip
    used = pd.concat([u["per_batch"] for u in uses], axis=1).mean(axis=1)
    return pd.DataFrame({"width": width, "used": used, "used (%)": mean, "± se (pp)": se})


def _table4(round1: list[Path], round2: list[Path]) -> pd.DataFrame:
    groups = {"round 1": _use(round1), "round 2": _use(round2)}
    paper = pd.DataFrame.from_dict(
        published.TABLE4, orient="index", columns=["round 1 used", "round 2 used", "round 1 (%)",
                                            "round 2 (%)"],
    )  # fmt: skip
    groups["paper (Table 4)"] = paper
    frame = pd.concat(groups, axis=1)
    frame.index.name = "layer"
    return frame


def final_losses(runs: list[Path]) -> list[float]:
    return [float(load_run(run).eval["val_loss"].iloc[-1]) for run in runs]


def _claims(table4: pd.DataFrame, round1: list[Path], round2: list[Path]) -> Table:
    one, two = table4["round 1"], table4["round 2"]
    diffs = {
        int(k): Estimate(float(two.loc[k, "used (%)"] - one.loc[k, "used (%)"]),
                         float(np.hypot(one.loc[k, "± se (pp)"], two.loc[k, "± se (pp)"])))
        for k in one.index
    }  # fmt: skip
    paper = table4["paper (Table 4)"]
    paper_diffs = {
        int(k): Estimate(float(paper.loc[k, "round 2 (%)"] - paper.loc[k, "round 1 (%)"]))
        for k in paper.index
    }
    loss1, loss2 = final_losses(round1), final_losses(round2)
    verdicts: dict[str, tuple[Verdict, Verdict]] = {
        "capacity_similar_fraction": (
            r.similar_fractions(paper_diffs), r.similar_fractions(diffs),
        ),
        "capacity_round2_worse": (
            RULES["capacity_round2_worse"].no_data(
                "§4.4: 'substantially worse performance', no losses published"),
            r.worse_by(welch(loss2, loss1), len(loss2), len(loss1)),
        ),
    }  # fmt: skip
    frame = pd.DataFrame.from_dict({
        RULES[key].claim: {"where": RULES[key].source, "rule": RULES[key].line,
                           "paper": paper_v, "this experiment": run_v}
        for key, (paper_v, run_v) in verdicts.items()
    }, orient="index")  # fmt: skip
    frame.index.name = "claim (the paper's words)"
    return Table("capacity_claims", "The paper's claims checked on this experiment",
                 "Each claim decided by its rule (docs/verdicts.md); the paper column applies "
                 "the same rule to Table 4 where the paper publishes numbers.", frame)  # fmt: skip


def write_report(out: Path, round1: list[Path], round2: list[Path]) -> Path:
    """Table 4, both rounds' losses, the claims, and the rounds' full run reports."""
    report = out / "report"
    table4 = _table4(round1, round2)
    labels = {p: p.name.replace("-", ", ") for p in [*round1, *round2]}
    rounds = {labels[p]: prepare(load_run(p), labels[p]) for p in [*round1, *round2]}
    scores = pd.DataFrame({label: rx.run_scores(rd) for label, rd in rounds.items()}).T
    scores.index.name = "round, seed"
    pct = {
        "round 1": table4["round 1"][["used (%)"]], "round 2": table4["round 2"][["used (%)"]],
        "paper round 1": table4["paper (Table 4)"][["round 1 (%)"]].set_axis(["used (%)"], axis=1),
        "paper round 2": table4["paper (Table 4)"][["round 2 (%)"]].set_axis(["used (%)"], axis=1),
    }  # fmt: skip
    figure = rx.figure_block(
        report / "figures", "capacity_use", "Units used per batch, % of the layer's width",
        "Round 1 of its preset width, round 2 of round 1's per-batch use (means over seeds); "
        "the paper's Table 4.",
        rx.use_by_layer_figure(pct, {"used (%)": "units used per batch (% of width)"}, "round"),
    )  # fmt: skip
    runs_index = write_runs_report([*round1, *round2], report / "runs")
    fmt = {c: (lambda v: f"{v:.1f}") for c in ("used (%)", "round 1 (%)", "round 2 (%)",
                                                "± se (pp)")}  # fmt: skip
    fmt.update({c: (lambda v: f"{v:.0f}") for c in ("width", "used", "round 1 used",
                                                     "round 2 used")})  # fmt: skip
    seeds = len(round1)
    sections = [
        Section("claims", "The paper's claims", [_claims(table4, round1, round2)]),
        Section("table4", "Table 4 — units used, round 1 and round 2", [Table(
            "table4", "Table 4: hidden units used per batch at the end of training",
            f"Units used in the device batch of the last measured step, mean over {seeds} "
            "seed(s) (± its standard error over seeds; one seed: binomial); round 2's width "
            "per layer = round 1's mean used units (rounded, at least 1); % of the round's "
            "width. The paper's round 1 had 32768 units per layer and 16 × 512 tokens per "
            "batch.",
            table4, fmt, shaded="paper (Table 4)",
        ), figure]),
        Section("scores", "Final loss per round and seed",
                [rx.scores_table("capacity_scores", scores)]),
        rx.runs_link_section("Both rounds in full", runs_index, report),
    ]  # fmt: skip
    return rx.write_document(
        report,
        "Capacity round 2 (Wild & Anderson §4.4, Table 4)",
        f"{seeds} seed(s) per round; round 2's widths = round 1's mean per-batch use.",
        sections,
    )
