"""The masking experiment (paper 4.1.1): are units unused in a batch at step K dead for good?

Arms, each trained with several seeds: *control* (no mask); *dead* (from step K+1 on, the units
unused in step K's batch are masked to zero); *random* (as many units per layer, chosen at
random); optionally *pruned* (the dead units physically removed, :mod:`.prune`). For one seed
all arms are the same run up to step K, so the control run is trained once with a checkpoint at
K and every other arm is forked from that checkpoint. The paper observed "no statistical
difference" in accuracy between dead-masked and control runs, and "performance collapse" for the
random mask, with about 30 % of all units masked.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from sparsetrace import paper as published
from sparsetrace.claims import RULES
from sparsetrace.claims import rules as r
from sparsetrace.claims.stats import Difference, Estimate, binomial_se_pct, detectable_effect, welch
from sparsetrace.config import TrainConfig, load_config
from sparsetrace.errors import UserError
from sparsetrace.experiments.prune import PRUNE_FILE, prune_run
from sparsetrace.experiments.runs import (
    arm_config,
    base_overrides,
    default_out,
    fork,
    open_experiment,
    run_to_end,
)
from sparsetrace.report import experiments as rx
from sparsetrace.report.document import Section, Table, Text
from sparsetrace.rundir import load_run

MASK_FRACTION = 0.25  # default K: this share of training...
MASK_WARMUPS = 2  # ...and at least this many warm-ups
# "The pruned run follows the dead-masked one": training-loss gap over the first steps after K.
# Rounding differs (other matrix shapes) and training amplifies it, so later gaps grow.
FIRST_GAP = f"max |Δ loss| first {r.PRUNE_STEPS} steps"


def default_mask_step(t: TrainConfig) -> int:
    """K when ``--at`` is 0: a quarter into training and at least two warm-ups.

    The paper masks at 50k of 1M steps (10 warm-ups, 5 % of training), where per-batch use had
    stabilised in every layer (its Figure 1). Runs of a few thousand steps have no such early
    plateau: a quarter of training is past the warm-up's transient dip of per-batch use and still
    leaves three quarters of training masked (the paper: "the final 90 %").
    """
    return min(max(round(MASK_FRACTION * t.steps), MASK_WARMUPS * t.warmup_steps), t.steps - 1)


def run_mask_experiment(
    preset: str, at: int, seeds: int, prune: bool, quick: bool, out: Path | None,
    overrides: list[str] | None,
) -> Path:  # fmt: skip
    """Train (or finish) every arm of every seed, then write the report; returns its index."""
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}")
    shared = base_overrides(quick, overrides)
    base = load_config(preset, shared)
    step = at or default_mask_step(base.train)
    if not 0 < step < base.train.steps:
        raise UserError(f"--at must lie in [1, {base.train.steps - 1}] (train.steps), got {at}")
    out = Path(out) if out else default_out(base, "mask", preset, quick)
    plan = {"experiment": "mask", "preset": preset, "overrides": shared, "at": step,
            "seeds": seeds, "prune": prune}  # fmt: skip
    open_experiment(out, plan)
    runs: dict[str, list[Path]] = {arm: [] for arm in ("control", "dead", "random")}
    for seed in range(base.train.seed, base.train.seed + seeds):
        # Every arm checkpoints at K (the fork point); the control keeps it for the forks.
        common = [*shared, "--train.seed", str(seed), "--mask.seed", str(seed),
                  "--checkpoint.every", str(step)]  # fmt: skip
        control_cfg = arm_config(preset, [*common, "--checkpoint.keep", "0"], out,
                                 f"control-seed{seed}")  # fmt: skip
        control = run_to_end(control_cfg)
        runs["control"].append(control)
        for kind in ("dead", "random"):
            arm = ["--checkpoint.keep", "1", "--mask.at_step", str(step), "--mask.kind", kind]
            cfg = arm_config(preset, [*common, *arm], out, f"{kind}-seed{seed}")
            runs[kind].append(run_to_end(cfg, seed=fork(control, step)))
        if prune:
            runs.setdefault("pruned", []).append(
                prune_run(control, step, out / f"pruned-seed{seed}")
            )
    return write_report(out, step, runs)


# --------------------------------------------------------------------------------------------------
# Data of the arms


def eval_curves(runs: dict[str, list[Path]]) -> pd.DataFrame:
    """arm, seed, step, val_loss, val_acc of every evaluation of every run."""
    frames = []
    for arm, paths in runs.items():
        for seed, path in enumerate(paths):
            ev = load_run(path).eval[["step", "val_loss", "val_acc"]]
            frames.append(ev.assign(arm=arm, seed=seed))
    return pd.concat(frames, ignore_index=True)


def final_scores(curves: pd.DataFrame) -> pd.DataFrame:
    """The last evaluation (end of training) of every run."""
    last = curves.groupby(["arm", "seed"], sort=False)["step"].transform("max")
    return curves[curves["step"] == last].reset_index(drop=True)


def masked_units(runs: dict[str, list[Path]]) -> pd.DataFrame:
    """Per arm, seed and layer: hidden units and masked units (mask.json)."""
    rows = []
    for arm in ("dead", "random"):
        for seed, path in enumerate(runs.get(arm, [])):
            info = json.loads((path / "mask.json").read_text())
            for name, layer in info["layers"].items():
                rows.append({"arm": arm, "seed": seed, "layer": int(name.split(".")[1]),
                             "hidden": layer["hidden"], "masked": layer["masked"]})  # fmt: skip
    return pd.DataFrame(rows, columns=["arm", "seed", "layer", "hidden", "masked"])


def pruned_vs_dead(runs: dict[str, list[Path]], step: int) -> pd.DataFrame:
    """Per seed: the pruned run's widths, its largest training-loss gap to the dead-masked run
    over the first steps after K and over all of them, and both runs' median step time after K."""
    rows = []
    for seed, (dead, pruned) in enumerate(zip(runs["dead"], runs["pruned"], strict=True)):
        td, tp = (load_run(p).train.set_index("step") for p in (dead, pruned))
        after = td.index[td.index >= step]
        info = json.loads((pruned / PRUNE_FILE).read_text())
        time_dead = float(td.loc[after, "step_time_s"].median())
        time_pruned = float(tp.loc[after, "step_time_s"].median())
        gap = (td.loc[after, "loss"] - tp.loc[after, "loss"]).abs()
        rows.append({
            "seed": seed, "kept widths": ", ".join(map(str, info["widths"])),
            "pruned (%)": 100 * info["pruned_fraction"],
            FIRST_GAP: float(gap.loc[: step + r.PRUNE_STEPS - 1].max()),
            "max |Δ loss| after K": float(gap.max()),
            "dead-mask step (ms)": 1000 * time_dead, "pruned step (ms)": 1000 * time_pruned,
            "speed-up": time_dead / time_pruned,
        })  # fmt: skip
    return pd.DataFrame(rows).set_index("seed")


# --------------------------------------------------------------------------------------------------
# Report


def _f(digits: int) -> Callable[[float], str]:
    return lambda v: f"{v:.{digits}f}"


def _p(v: float) -> str:
    return f"{v:.3g}"


def _summary(finals: pd.DataFrame) -> pd.DataFrame:
    g = finals.groupby("arm", sort=False)
    return pd.DataFrame({
        "seeds": g.size(),
        "val loss": g["val_loss"].mean(), "± std (loss)": g["val_loss"].std(),
        "val acc (%)": 100 * g["val_acc"].mean(), "± std (acc)": 100 * g["val_acc"].std(),
        "per seed val loss": g["val_loss"].agg(lambda s: ", ".join(f"{v:.4f}" for v in s)),
    })  # fmt: skip


Comparisons = dict[tuple[str, str, str], Difference | None]


def comparisons(finals: pd.DataFrame) -> Comparisons:
    """Welch comparisons of final val loss and accuracy for each pair of arms compared (None
    where an arm has fewer than two seeds)."""
    arms = set(finals["arm"])
    pairs = [("dead", "control"), ("random", "control"), ("random", "dead"), ("pruned", "dead")]
    out: Comparisons = {}
    for a, b in pairs:
        if a in arms and b in arms:
            for metric in ("val_loss", "val_acc"):
                xa = finals.loc[finals["arm"] == a, metric].to_numpy()
                xb = finals.loc[finals["arm"] == b, metric].to_numpy()
                out[(a, b, metric)] = welch(xa, xb)
    return out


def _tests_table(tests: Comparisons, finals: pd.DataFrame) -> Table:
    rows = {}
    for (a, b, metric), d in tests.items():
        if d is None:
            continue
        rows[f"{a} − {b}: {metric}"] = {
            "difference": d.diff, "95 % CI low": d.low, "95 % CI high": d.high,
            "t": d.t, "df": d.df, "p": d.p,
            "detectable (80 % power)": detectable_effect(d.n_a, d.n_b) * d.pooled_sd,
        }  # fmt: skip
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "comparison (final)"
    fmt = {c: _f(4) for c in frame.columns}
    fmt.update({"t": _f(2), "df": _f(1), "p": _p})
    return Table(
        "mask_tests", "Welch comparisons between arms",
        "Welch's unequal-variance t statistics of the final validation loss (nats) and "
        "next-token accuracy (fraction) across seeds (scipy.stats.ttest_ind(equal_var=False)); "
        "difference = mean(first arm) − mean(second). 'detectable' = the difference a two-sided "
        "test at α = 0.05 finds with 80 % probability (Cohen's d from the noncentral t for these "
        "seed counts, times the arms' pooled seed-to-seed standard deviation). The claims use "
        "equivalence margins and effect sizes, not these p-values (docs/verdicts.md).",
        frame, fmt,
    )  # fmt: skip


def _claims(
    tests: Comparisons, finals: pd.DataFrame, masked: pd.DataFrame, step: int,
    prune_table: pd.DataFrame | None,
) -> Table:  # fmt: skip
    n = finals.groupby("arm").size()
    seeds = {arm: int(n.get(arm, 0)) for arm in ("control", "dead", "random")}
    verdicts = {
        "mask_dead_equivalent": r.equivalence(
            tests.get(("dead", "control", "val_loss")), tests.get(("dead", "control", "val_acc")),
            seeds["dead"], seeds["control"],
        ),
        "mask_random_collapse": r.collapse(
            tests.get(("random", "control", "val_loss")),
            tests.get(("random", "dead", "val_loss")), seeds["random"], seeds["control"],
        ),
        "mask_fraction_about_30": r.per_layer_band(
            {f"at step {step}": masked_share(masked)}, published.PAPER_MASKED_PCT,
            "the masked share",
        ),
    }  # fmt: skip
    paper_column = {
        "mask_dead_equivalent": "no statistical difference (§4.1.1: no numbers published)",
        "mask_random_collapse": "performance collapse (§4.1.1: no numbers published)",
        "mask_fraction_about_30": f"about {published.PAPER_MASKED_PCT:g} % (at step "
        f"{published.PAPER_MASK_STEP:,} of {published.TOTAL_STEPS:,})",
    }  # fmt: skip
    if prune_table is not None:
        first = float(prune_table[FIRST_GAP].max())
        late = float(prune_table["max |Δ loss| after K"].max())
        verdicts["mask_pruned_equal"] = r.pruned_equal(
            first,
            f"over all steps after K {late:.2g} (rounding, amplified by training); median "
            f"step {prune_table['speed-up'].mean():.2f}× as fast",
        )
        paper_column["mask_pruned_equal"] = "–"
    rows = {
        RULES[key].claim: {
            "where": RULES[key].source, "rule": RULES[key].line,
            "paper": RULES[key].no_data(paper_column[key]), "this experiment": verdict,
        }
        for key, verdict in verdicts.items()
    }  # fmt: skip
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "claim (the paper's words)"
    return Table("mask_claims", "The paper's claims checked on this experiment",
                 "Each claim decided by its rule (docs/verdicts.md): holds / does not hold / "
                 "inconclusive (with what would decide it) / n/a.", frame)  # fmt: skip


def masked_share(masked: pd.DataFrame) -> Estimate:
    """The dead mask's share of all units (%): mean over seeds with its standard error (one
    seed: the binomial error of that share)."""
    dead = masked[masked["arm"] == "dead"].groupby("seed")[["hidden", "masked"]].sum()
    shares = 100 * dead["masked"] / dead["hidden"]
    if len(shares) >= 2:
        return Estimate(float(shares.mean()), float(shares.std(ddof=1) / np.sqrt(len(shares))),
                        len(shares))  # fmt: skip
    value = float(shares.iloc[0]) if len(shares) else float("nan")
    return Estimate(value, binomial_se_pct(value, int(dead["hidden"].sum())), 1)


def _masked_table(masked: pd.DataFrame) -> Table:
    per = masked.groupby(["arm", "layer"])[["hidden", "masked"]].mean()
    frame = pd.DataFrame({
        "hidden": per.loc["dead", "hidden"], "dead: masked units": per.loc["dead", "masked"],
        "dead: masked (%)": 100 * per.loc["dead", "masked"] / per.loc["dead", "hidden"],
        "random: masked (%)": 100 * per.loc["random", "masked"] / per.loc["random", "hidden"],
    })  # fmt: skip
    total = frame[["hidden", "dead: masked units"]].sum()
    overall = 100 * total["dead: masked units"] / total["hidden"]
    frame.loc["all"] = [total["hidden"], total["dead: masked units"], overall,
                        100 * per.loc["random", "masked"].sum() / total["hidden"]]  # fmt: skip
    frame.index = frame.index.astype(str)
    frame.index.name = "layer"
    return Table(
        "mask_fraction", "Masked units per layer",
        "Units unused in step K's batch (dead) and the random mask's count (the same per layer, "
        "by construction), mean over seeds, from each run's mask.json. 'all' = over all layers "
        f"(the paper: about {published.PAPER_MASKED_PCT:g} % in aggregate; no per-layer values).",
        frame, {c: _f(1) for c in frame.columns},
    )  # fmt: skip


def _over_training(curves: pd.DataFrame, step: int) -> Table:
    mean = curves.groupby(["arm", "step"])[["val_loss", "val_acc"]].mean()
    frame = pd.concat(
        {
            arm: pd.DataFrame(
                {
                    "val loss": mean.loc[arm, "val_loss"],
                    "val acc (%)": 100 * mean.loc[arm, "val_acc"],
                }
            )
            for arm in dict.fromkeys(curves["arm"])
        },
        axis=1,
    )
    frame.index.name = "step"
    return Table(
        "mask_over_training", "Validation loss and accuracy over training",
        f"Mean over seeds at every evaluation; the masks apply from step {step + 1} on.",
        frame, {"val loss": _f(4), "val acc (%)": _f(2)},
    )  # fmt: skip


def write_report(out: Path, step: int, runs: dict[str, list[Path]]) -> Path:
    """The experiment's report in ``out/report``; returns its index.html."""
    report = out / "report"
    curves = eval_curves(runs)
    finals = final_scores(curves)
    tests = comparisons(finals)
    masked = masked_units(runs)
    mask_table = _masked_table(masked)
    prune_table = pruned_vs_dead(runs, step) if "pruned" in runs else None
    n_seeds = len(runs["control"])
    summary = Table(
        "mask_final", "Final validation loss and accuracy per arm",
        "Mean and standard deviation over seeds of the last evaluation.", _summary(finals),
        {"val loss": _f(4), "± std (loss)": _f(4), "val acc (%)": _f(2), "± std (acc)": _f(2),
         "seeds": str},
    )  # fmt: skip
    figure = rx.figure_block(
        report / "figures", "mask_curves", "Validation loss and accuracy per arm",
        f"Mean over seeds (band: ± 1 standard deviation); dotted: step K = {step}.",
        rx.arm_curves_figure(curves, step),
    )  # fmt: skip
    setup = Text(
        f"Arms: control; dead = units unused in step {step}'s batch masked from step "
        f"{step + 1} on; random = as many units per layer chosen at random"
        + ("; pruned = the dead units removed from the model (not in the paper)" if prune_table
           is not None else "")
        + f". {n_seeds} seed(s) per arm; every arm of a seed is the control run up to step "
        f"{step} (forked from its checkpoint). Run directories: {out}."
    )  # fmt: skip
    sections = [
        Section("setup", "Setup", [setup]),
        Section("claims", "The paper's claims", [
            _claims(tests, finals, masked, step, prune_table)
        ]),
        Section("final", "End of training", [summary, _tests_table(tests, finals)]),
        Section("masked", "Masked units", [mask_table]),
        Section("curves", "Over training", [figure, _over_training(curves, step)]),
    ]  # fmt: skip
    if prune_table is not None:
        sections.append(Section("pruned", "Pruned vs dead-masked (beyond the paper)", [Table(
            "mask_pruned", "The pruned arm against the dead-masked arm",
            "Same seeds; step times are medians over the steps after K, measured on a machine "
            "shared with other work (indicative only; see benchmarks/prune_bench.py).",
            prune_table, {"pruned (%)": _f(1), FIRST_GAP: lambda v: f"{v:.2g}",
                          "max |Δ loss| after K": lambda v: f"{v:.2g}",
                          "dead-mask step (ms)": _f(1), "pruned step (ms)": _f(1),
                          "speed-up": _f(2)},
        )]))  # fmt: skip
    return rx.write_document(
        report,
        "Masking experiment (Wild & Anderson §4.1.1)",
        f"Masking at step {step}: dead vs random hidden units, {n_seeds} seed(s) per arm.",
        sections,
    )
