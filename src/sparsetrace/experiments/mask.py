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
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import optimize, stats

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
from sparsetrace.report import paper as published
from sparsetrace.report.document import Section, Table, Text, Verdict
from sparsetrace.report.findings import NA, NOT_SHOWN, PARTLY, YES
from sparsetrace.rundir import load_run

ALPHA = 0.05
POWER = 0.8
MASK_FRACTION = 0.25  # default K: this share of training...
MASK_WARMUPS = 2  # ...and at least this many warm-ups
# "The pruned run follows the dead-masked one": training-loss gap over the first steps after K.
# Rounding differs (other matrix shapes) and training amplifies it, so later gaps grow.
PRUNE_STEPS = 10
PRUNE_TOLERANCE = 1e-4  # nats
FIRST_GAP = f"max |Δ loss| first {PRUNE_STEPS} steps"


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
# Statistics


@dataclass(frozen=True)
class Welch:
    """Welch's unequal-variance t-test of mean(a) - mean(b), with its 95 % confidence interval."""

    diff: float
    low: float
    high: float
    t: float
    df: float
    p: float


def welch(a: np.ndarray, b: np.ndarray) -> Welch:
    """Two-sided Welch t-test (scipy); NaN where a sample has fewer than two values."""
    if len(a) < 2 or len(b) < 2:
        return Welch(float(np.mean(a) - np.mean(b)), *[math.nan] * 5)
    r = stats.ttest_ind(a, b, equal_var=False)
    ci = r.confidence_interval(1 - ALPHA)
    return Welch(float(np.mean(a) - np.mean(b)), float(ci.low), float(ci.high),
                 float(r.statistic), float(r.df), float(r.pvalue))  # fmt: skip


def detectable_effect(n1: int, n2: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """Smallest difference, in standard deviations (Cohen's d), that a two-sided t-test at level
    ``alpha`` detects with probability ``power`` (equal variances, noncentral t)."""
    if min(n1, n2) < 2:
        return math.nan
    df = n1 + n2 - 2
    crit = stats.t.ppf(1 - alpha / 2, df)
    scale = math.sqrt(1 / n1 + 1 / n2)
    return optimize.brentq(lambda d: stats.nct.sf(crit, df, d / scale) - power, 1e-6, 1e3)


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
            FIRST_GAP: float(gap.loc[: step + PRUNE_STEPS - 1].max()),
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


def comparisons(finals: pd.DataFrame) -> dict[tuple[str, str, str], Welch]:
    """Welch tests of final val loss and accuracy for each pair of arms compared."""
    arms = set(finals["arm"])
    pairs = [("dead", "control"), ("random", "control"), ("random", "dead"), ("pruned", "dead")]
    out = {}
    for a, b in pairs:
        if a in arms and b in arms:
            for metric in ("val_loss", "val_acc"):
                xa = finals.loc[finals["arm"] == a, metric].to_numpy()
                xb = finals.loc[finals["arm"] == b, metric].to_numpy()
                out[(a, b, metric)] = welch(xa, xb)
    return out


def _tests_table(tests: dict[tuple[str, str, str], Welch], finals: pd.DataFrame) -> Table:
    sd = finals.groupby("arm")[["val_loss", "val_acc"]].std()
    rows = {}
    for (a, b, metric), w in tests.items():
        n_a, n_b = (int((finals["arm"] == x).sum()) for x in (a, b))
        pooled = math.sqrt((sd.loc[a, metric] ** 2 + sd.loc[b, metric] ** 2) / 2)
        rows[f"{a} − {b}: {metric}"] = {
            "difference": w.diff, "95 % CI low": w.low, "95 % CI high": w.high,
            "t": w.t, "df": w.df, "p": w.p,
            "detectable (80 % power)": detectable_effect(n_a, n_b) * pooled,
        }  # fmt: skip
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "comparison (final)"
    fmt = {c: _f(4) for c in frame.columns}
    fmt.update({"t": _f(2), "df": _f(1), "p": _p})
    return Table(
        "mask_tests", "Welch's t-tests between arms",
        "Two-sided Welch t-test (unequal variances, scipy.stats.ttest_ind(equal_var=False)) of "
        "the final validation loss (nats) and next-token accuracy (fraction) across seeds; "
        "difference = mean(first arm) − mean(second). 'detectable' = the difference this test "
        f"finds with 80 % probability at α = {ALPHA} (Cohen's d from the noncentral t for these "
        "seed counts, times the two arms' pooled seed-to-seed standard deviation).",
        frame, fmt,
    )  # fmt: skip


def _claims(
    tests: dict[tuple[str, str, str], Welch], curves: pd.DataFrame, masked_pct: float, step: int,
    n_seeds: int, prune_table: pd.DataFrame | None,
) -> Table:  # fmt: skip
    d = detectable_effect(n_seeds, n_seeds)
    rows = {}
    dl, da = tests.get(("dead", "control", "val_loss")), tests.get(("dead", "control", "val_acc"))
    if dl is None or math.isnan(dl.p):
        dead = Verdict(NA, "needs at least 2 seeds per arm")
    else:
        over = _significant_evaluations(curves, step)
        ok = dl.p >= ALPHA and da.p >= ALPHA
        dead = Verdict(
            YES if ok else NOT_SHOWN,
            f"final val loss {dl.diff:+.4f} nats (p = {dl.p:.3g}), accuracy "
            f"{100 * da.diff:+.2f} points (p = {da.p:.3g}); accuracy differs significantly at "
            f"{over}. With {n_seeds} seeds per arm only differences of about {d:.1f} seed standard "
            "deviations are detected reliably: 'no difference' is weak evidence of equivalence.",
        )
    rows["dead mask: no statistical difference in accuracy vs control"] = {
        "where": "§4.1.1",
        "paper": "no statistical difference",
        "this run": dead,
    }
    rl = tests.get(("random", "control", "val_loss"))
    if rl is None or math.isnan(rl.p):
        rand = Verdict(NA, "needs at least 2 seeds per arm")
    else:
        worse = rl.diff > 0
        ra = tests[("random", "control", "val_acc")]
        rand = Verdict(
            YES if worse and rl.p < ALPHA else PARTLY if worse else NOT_SHOWN,
            f"final val loss {rl.diff:+.4f} nats (p = {rl.p:.3g}), accuracy "
            f"{100 * ra.diff:+.2f} points (p = {ra.p:.3g}); yes = significantly worse than "
            f"control (α = {ALPHA}), partly = worse but not significantly.",
        )
    rows["random mask of the same size: performance collapse"] = {
        "where": "§4.1.1",
        "paper": "performance collapse",
        "this run": rand,
    }
    lo, hi = published.PAPER_MASKED_PCT / 2, published.PAPER_MASKED_PCT * 2
    rows["about 30 % of all units masked"] = {
        "where": "§4.1.1",
        "paper": f"~{published.PAPER_MASKED_PCT:g} % (at step {published.PAPER_MASK_STEP:,})",
        "this run": Verdict(
            YES if lo <= masked_pct <= hi else NOT_SHOWN,
            f"{masked_pct:.1f} % at step {step} (yes within {lo:g}-{hi:g} %)",
        ),
    }  # fmt: skip
    if prune_table is not None:
        first = float(prune_table[FIRST_GAP].max())
        late = float(prune_table["max |Δ loss| after K"].max())
        pl = tests.get(("pruned", "dead", "val_loss"))
        final = "" if pl is None or math.isnan(pl.p) else f", final val loss p = {pl.p:.3g}"
        rows["pruning the dead units instead of masking them changes nothing"] = {
            "where": "beyond the paper (§4.1.1 suggests it)", "paper": "–",
            "this run": Verdict(
                YES if first <= PRUNE_TOLERANCE else NOT_SHOWN,
                f"training-loss gap to the dead-masked run over the first {PRUNE_STEPS} steps "
                f"after K: {first:.2g} nats (yes ≤ {PRUNE_TOLERANCE:g}); over all steps after K "
                f"{late:.2g} (rounding, amplified by training){final}; median step "
                f"{prune_table['speed-up'].mean():.2f}× as fast",
            ),
        }  # fmt: skip
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "claim"
    return Table("mask_claims", "The paper's claims checked on this run",
                 "Verdicts: yes / partly / not shown / n/a, with the numbers behind them.",
                 frame)  # fmt: skip


def _significant_evaluations(curves: pd.DataFrame, step: int) -> str:
    """'k of m evaluations after K' at which dead vs control accuracy differs (Welch, α)."""
    after = curves[curves["step"] > step]
    hits, total = 0, 0
    for _, group in after.groupby("step"):
        a = group.loc[group["arm"] == "dead", "val_acc"].to_numpy()
        b = group.loc[group["arm"] == "control", "val_acc"].to_numpy()
        w = welch(a, b)
        if not math.isnan(w.p):
            total += 1
            hits += w.p < ALPHA
    return f"{hits} of {total} evaluations after step {step}"


def _masked_table(masked: pd.DataFrame) -> tuple[Table, float]:
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
    table = Table(
        "mask_fraction", "Masked units per layer",
        "Units unused in step K's batch (dead) and the random mask's count (the same per layer, "
        "by construction), mean over seeds, from each run's mask.json. 'all' = over all layers "
        f"(the paper: about {published.PAPER_MASKED_PCT:g} % in aggregate; no per-layer values).",
        frame, {c: _f(1) for c in frame.columns},
    )  # fmt: skip
    return table, overall


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
    mask_table, overall = _masked_table(masked_units(runs))
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
            _claims(tests, curves, overall, step, n_seeds, prune_table)
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
