"""Sparsing Law, width vs depth: the limit activation ratio against ``d_model / n_layers`` at one
parameter budget.

The budget is the preset's non-embedding parameter count. Each arm has a gated MLP with
``d_ff = 2.5 * d_model`` (the paper's setting; gated ReLU, reglu, by default), the preset's head
dimension (heads = d_model / head_dim), and as many layers as keep its non-embedding parameters
nearest the budget: for a target width-depth ratio r, ``d_model`` solves ``budget = (d_model / r)
* k * d_model**2`` (k = 4 attention + 2.5 * 3 MLP matrices) rounded to a multiple of the head
dimension, then ``n_layers = round((budget - final norm) / parameters per block)``. Each arm is
trained (resumable) with ``activations.CHECKPOINTS`` evenly spaced checkpoints, measured at
PPL-p% on all of them (one CETT, chosen on the last ones) and the Sparsing Law of its activation
fitted to the layer-mean curve: its limit A0 is the arm's activation ratio. The training loss
after warm-up gets its own power law, whose limit L_inf is the arm's limit loss. The report fits
the two-segment line of A0 over the ratio and decides the paper's bottleneck by its rule
(``width_depth_bottleneck``, :func:`sparsetrace.report.sparsing.write_width_depth_report`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from sparsetrace.config import RunConfig, load_config
from sparsetrace.errors import UserError
from sparsetrace.experiments.activations import CHECKPOINTS, LAST, law_curve, measure
from sparsetrace.experiments.runs import (
    arm_config,
    base_overrides,
    default_out,
    open_experiment,
    run_dir,
    run_to_end,
)
from sparsetrace.experiments.sweep import Arm, split_values
from sparsetrace.model.transformer import GATED, ModelConfig
from sparsetrace.report import experiments as rx
from sparsetrace.report.rundata import prepare
from sparsetrace.report.sparsing import write_width_depth_report
from sparsetrace.rundir import Run, load_run
from sparsetrace.sparsing.laws import MIN_POINTS, LossFit, fit_loss_law, law_form

FF_FACTOR = 2.5  # Sparsing Law: gated MLP with d_ff = 2.5 * d_model
# From deep and narrow to one or two layers: at the cpu budget 96x33 (ratio 2.9) to 544x1 (544),
# past the paper's bottleneck (~114); at the quick scale 48x12 (4) to 176x1 (176), 6 shapes.
DEFAULT_RATIOS = "3,6,12,24,48,96,192,512"


@dataclass(frozen=True)
class ArmShape:
    """One arm's model shape."""

    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int

    @property
    def ratio(self) -> float:
        """The width-depth ratio d_model / n_layers."""
        return self.d_model / self.n_layers

    @property
    def name(self) -> str:
        return f"d_model={self.d_model}+n_layers={self.n_layers}"

    def overrides(self) -> list[str]:
        return [item for key, value in (("d_model", self.d_model), ("n_layers", self.n_layers),
                                        ("n_heads", self.n_heads), ("d_ff", self.d_ff))
                for item in (f"--model.{key}", str(value))]  # fmt: skip


def _norm_params(m: ModelConfig) -> int:
    return m.d_model * (2 if m.norm == "layernorm" and m.bias else 1)


def block_params(m: ModelConfig, d_ff: int) -> int:
    """Parameters of one block of width ``d_ff``: attention (qkv, output), MLP (W_in, twice as
    wide when gated, and W_out), two norms; biases as the config has them."""
    d, bias, gates = m.d_model, int(bool(m.bias)), 2 if m.activation in GATED else 1
    attention = 4 * d * d + 4 * d * bias
    mlp = d * d_ff * gates + d_ff * gates * bias + d_ff * d + d * bias
    return attention + mlp + 2 * _norm_params(m)


def non_embedding_params(m: ModelConfig) -> int:
    """All parameters but the token and position embeddings (and the tied output head)."""
    return sum(block_params(m, w) for w in m.widths) + _norm_params(m)


def shape_for_ratio(base: ModelConfig, budget: int, ratio: float, activation: str) -> ArmShape:
    """The gated-MLP shape of width-depth ratio near ``ratio`` with ``budget`` non-embedding
    parameters, at ``base``'s head dimension and conventions (bias, norm)."""
    head_dim = base.d_model // base.n_heads
    per_d3 = 4 + FF_FACTOR * 3  # block parameters / d_model**2, gated, without biases and norms
    # One layer is the widest shape the budget holds: a larger target would outgrow the budget.
    ratio = min(ratio, math.sqrt(budget / per_d3))
    d_model = max(1, round((budget * ratio / per_d3) ** (1 / 3) / head_dim)) * head_dim
    d_ff = round(FF_FACTOR * d_model)
    m = replace(base, d_model=d_model, n_heads=d_model // head_dim, d_ff=d_ff, n_layers=1,
                d_ff_per_layer=None, activation=activation)  # fmt: skip
    n_layers = max(1, round((budget - _norm_params(m)) / block_params(m, d_ff)))
    return ArmShape(d_model, n_layers, m.n_heads, d_ff)


def parse_ratios(text: str) -> list[float]:
    try:
        ratios = [float(v) for v in split_values(text)]
    except ValueError:
        raise UserError(f"--ratios: expected numbers like 4,8,16; got {text!r}") from None
    if any(not r > 0 for r in ratios):
        raise UserError(f"--ratios must be positive; got {text!r}")
    return ratios


def build_arms(
    preset: str, shared: list[str], shapes: list[ArmShape], activation: str, out: Path
) -> list[Arm]:
    """One arm per distinct shape (ratios giving the same shape share it), typed by the config."""
    arms: list[Arm] = []
    for shape in dict.fromkeys(shapes):
        own = [*shape.overrides(), "--model.activation", activation]
        cfg = arm_config(preset, [*shared, *own], out, shape.name)
        values = {f"model.{k}": getattr(cfg.model, k)
                  for k in ("d_model", "n_layers", "n_heads", "d_ff", "activation")}  # fmt: skip
        arms.append(Arm(len(arms), cfg, values))
    return arms


def limit_loss(run: Run, warmup: int) -> LossFit | None:
    """The training-loss law fitted to a run's per-step loss after warm-up (None: too few
    steps). A row's loss is measured before its update, on a model that has seen ``tokens``
    (``step`` updates): rows up to ``step == warmup`` are warm-up models, left out as
    :func:`~sparsetrace.sparsing.laws.warmup_points` leaves out their checkpoints."""
    rows = run.train[(run.train["step"] > warmup) & (run.train["tokens"] > 0)]
    if len(rows) < MIN_POINTS:
        return None
    return fit_loss_law(rows["tokens"].to_numpy(float), rows["loss"].to_numpy(float))


def arm_row(cfg: RunConfig, form: str, csv: Path) -> dict:
    """One arm's table row: its shape, the final and the limit activation ratio (A0 of its
    Sparsing Law, 95 % interval, why it is undetermined or ''), final losses and the limit loss
    (L_inf, 95 % interval, why it is undetermined or '')."""
    curve = law_curve(cfg.run_name, form, csv, cfg.train.warmup_steps)
    law, run, m = curve.fit, load_run(run_dir(cfg)), cfg.model
    loss = limit_loss(run, cfg.train.warmup_steps)
    a0_low, a0_high = law.a0_low_high if law else (math.nan, math.nan)
    loss_low, loss_high = loss.interval if loss else (math.nan, math.nan)
    scores = rx.run_scores(prepare(run, cfg.run_name))
    return {
        "d_model": m.d_model, "n_layers": m.n_layers, "n_heads": m.n_heads, "d_ff": m.d_ff,
        "parameters": non_embedding_params(m), "width-depth ratio": m.d_model / m.n_layers,
        "checkpoints": len(curve.ratio), "final activation ratio": float(curve.ratio[-1]),
        "limit A0": law.limit if law else math.nan, "A0 low": a0_low, "A0 high": a0_high,
        "A0 undetermined": law.limit_undetermined if law else curve.note,
        "val loss": scores["val loss"], "train loss (last 5 %)": scores["train loss (last 5 %)"],
        "limit loss": loss.limit if loss else math.nan, "L_inf low": loss_low,
        "L_inf high": loss_high,
        "L_inf undetermined": loss.limit_undetermined if loss else "too few steps after warm-up",
    }  # fmt: skip


def run_width_depth_experiment(
    preset: str, ratios: str, activation: str, p: float, tokens: int, quick: bool,
    out: Path | None, overrides: list[str] | None,
) -> Path:  # fmt: skip
    """Train one arm per width-depth ratio at the preset's budget, measure and fit each over its
    checkpoints, write the report."""
    if activation not in GATED:
        raise UserError(f"--activation must be gated ({', '.join(GATED)}); got {activation!r}")
    form = law_form(activation)
    base = load_config(preset, base_overrides(quick, overrides))
    budget = non_embedding_params(base.model)
    every = ["--checkpoint.every", str(max(1, base.train.steps // CHECKPOINTS))]
    shared = base_overrides(quick, [*every, *(overrides or [])])  # the user's own value wins
    shapes = [shape_for_ratio(base.model, budget, r, activation)
              for r in parse_ratios(ratios or DEFAULT_RATIOS)]  # fmt: skip
    out = Path(out) if out else default_out(base, "width-depth", preset, quick)
    arms = build_arms(preset, shared, shapes, activation, out)
    open_experiment(out, {"experiment": "width-depth", "preset": preset, "overrides": shared,
                          "budget": budget, "arms": [a.cfg.run_name for a in arms]})  # fmt: skip
    rows = {}
    for arm in arms:
        run_to_end(arm.cfg)
        csv = measure(run_dir(arm.cfg), p, tokens, LAST)
        rows[arm.cfg.run_name] = arm_row(arm.cfg, form, csv)
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "arm"
    return write_width_depth_report(out, frame, budget, p, form)
