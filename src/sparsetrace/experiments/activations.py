"""Sparsing Law, activation functions over training: one run per activation of one preset.

Each arm (a sweep over ``model.activation``, resumable: a finished arm is not trained again)
keeps ``CHECKPOINTS`` evenly spaced checkpoints; ``sparsing_law`` measures the PPL-p% activation
ratio at each (one CETT per run, chosen on its last checkpoints), and the Sparsing Law's form is
fitted to ratio vs tokens: the ReLU law for relu-like activations, the SiLU law for
silu/gelu-like ones. The report checks the paper's finding on these runs: ReLU's activation ratio
falls over training, SiLU's rises (:func:`sparsetrace.claims.sparsing.check_finding`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from sparsetrace.checkpoint import list_checkpoints
from sparsetrace.claims.sparsing import Curve
from sparsetrace.config import load_config
from sparsetrace.experiments.runs import (
    base_overrides,
    default_out,
    open_experiment,
    run_dir,
    run_to_end,
)
from sparsetrace.experiments.sweep import build_arms, split_values
from sparsetrace.report.sparsing import fit_curve, write_activations_report
from sparsetrace.sparsing.laws import law_form
from sparsetrace.sparsing.over_training import CSV_NAME, JSON_NAME, sparsing_law
from sparsetrace.sparsing.source import WINDOWS

CHECKPOINTS = 8  # per run: the ReLU law has 4 parameters, a fit needs MIN_POINTS = 5
LAST = 5  # final checkpoints the CETT is chosen on (the public scripts' choice)
KEY = "model.activation"


def measure(run: Path, p: float, tokens: int, last: int) -> Path:
    """``sparsing_law.csv`` of a trained run: measured, unless ``sparsing_law.json`` is newer
    than the newest checkpoint and was measured at the same p, token count and choice of windows
    (then kept as it is; a file from before ``tokens_requested`` and ``windows`` were recorded is
    measured again: its windows were contiguous)."""
    summary, newest = run / JSON_NAME, list_checkpoints(run)[-1]
    done = json.loads(summary.read_text()) if summary.is_file() else {}
    if (
        done
        and (run / CSV_NAME).is_file()
        and summary.stat().st_mtime > newest.stat().st_mtime
        and done.get("p") == p
        and done.get("tokens_requested") == tokens
        and done.get("windows") == WINDOWS
    ):
        print(f"{run}: sparsing law up to date", flush=True)
        return run / CSV_NAME
    print(f"{run}: measuring PPL-{p:g}% sparsity at {len(list_checkpoints(run))} checkpoints",
          flush=True)  # fmt: skip
    return sparsing_law(run, p=p, tokens=tokens, last=last)


def layer_mean(csv: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(step, tokens, activation ratio) of the mean over layers (rows ``layer == all``), by
    tokens."""
    frame = pd.read_csv(csv, dtype={"layer": str})
    rows = frame[frame["layer"] == "all"].sort_values("tokens")
    return tuple(rows[k].to_numpy(float) for k in ("step", "tokens", "activation_ratio"))


def law_curve(label: str, form: str, csv: Path, warmup_steps: int) -> Curve:
    """A run's curve from its ``sparsing_law.csv``, the law fitted after warm-up
    (:func:`~sparsetrace.report.sparsing.fit_curve`)."""
    return fit_curve(label, form, *layer_mean(csv), warmup_steps)


def run_activations_experiment(
    preset: str, activations: str, p: float, tokens: int, quick: bool,
    out: Path | None, overrides: list[str] | None,
) -> Path:  # fmt: skip
    """Train one run per activation (resumable), measure and fit each, write the report."""
    names = split_values(activations)
    forms = {name: law_form(name) for name in names}
    steps = load_config(preset, base_overrides(quick, overrides)).train.steps
    every = ["--checkpoint.every", str(max(1, steps // CHECKPOINTS))]
    shared = base_overrides(quick, [*every, *(overrides or [])])  # the user's own value wins
    base = load_config(preset, shared)
    out = Path(out) if out else default_out(base, "activations", preset, quick)
    arms = build_arms(preset, shared, [(KEY, names)], out)
    open_experiment(out, {"experiment": "activations", "preset": preset, "overrides": shared,
                          "arms": [a.cfg.run_name for a in arms]})  # fmt: skip
    curves = []
    for arm in arms:
        run_to_end(arm.cfg)
        csv = measure(run_dir(arm.cfg), p, tokens, LAST)
        name = arm.values[KEY]
        curves.append(law_curve(name, forms[name], csv, arm.cfg.train.warmup_steps))
    return write_activations_report(out, curves, p)
