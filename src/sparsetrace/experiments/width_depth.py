"""Sparsing Law, width vs depth: activation ratio against ``d_model / n_layers`` at one budget.

The budget is the preset's non-embedding parameter count. Each arm has a gated MLP with
``d_ff = 2.5 * d_model`` (the paper's setting; swiglu by default), the preset's head dimension
(heads = d_model / head_dim), and as many layers as keep its non-embedding parameters nearest the
budget: for a target width-depth ratio r, ``d_model`` solves ``budget = (d_model / r) * k *
d_model**2`` (k = 4 attention + 2.5 * 3 MLP matrices) rounded to a multiple of the head dimension,
then ``n_layers = round((budget - final norm) / parameters per block)``. Each arm is trained
(resumable, one checkpoint at the end) and measured at PPL-p% on its final checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from sparsetrace.config import load_config
from sparsetrace.errors import UserError
from sparsetrace.experiments.activations import measure
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
from sparsetrace.report.analysis import prepare
from sparsetrace.report.sparsing import write_width_depth_report
from sparsetrace.rundir import load_run
from sparsetrace.sparsing.over_training import JSON_NAME

FF_FACTOR = 2.5  # Sparsing Law: gated MLP with d_ff = 2.5 * d_model
DEFAULT_RATIOS = "4,8,16,32,64"


@dataclass(frozen=True)
class Shape:
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


def shape_for_ratio(base: ModelConfig, budget: int, ratio: float, activation: str) -> Shape:
    """The gated-MLP shape of width-depth ratio near ``ratio`` with ``budget`` non-embedding
    parameters, at ``base``'s head dimension and conventions (bias, norm)."""
    head_dim = base.d_model // base.n_heads
    per_d3 = 4 + FF_FACTOR * 3  # block parameters / d_model**2, gated, without biases and norms
    d_model = max(1, round((budget * ratio / per_d3) ** (1 / 3) / head_dim)) * head_dim
    d_ff = round(FF_FACTOR * d_model)
    m = replace(base, d_model=d_model, n_heads=d_model // head_dim, d_ff=d_ff, n_layers=1,
                d_ff_per_layer=None, activation=activation)  # fmt: skip
    n_layers = max(1, round((budget - _norm_params(m)) / block_params(m, d_ff)))
    return Shape(d_model, n_layers, m.n_heads, d_ff)


def parse_ratios(text: str) -> list[float]:
    try:
        ratios = [float(v) for v in split_values(text)]
    except ValueError:
        raise UserError(f"--ratios: expected numbers like 4,8,16; got {text!r}") from None
    if any(not r > 0 for r in ratios):
        raise UserError(f"--ratios must be positive; got {text!r}")
    return ratios


def build_arms(
    preset: str, shared: list[str], shapes: list[Shape], activation: str, out: Path
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


def final_ratio(run: Path) -> float:
    """Activation ratio (mean of layers) at the run's last measured checkpoint."""
    return float(json.loads((run / JSON_NAME).read_text())["checkpoints"][-1]["activation_ratio"])


def run_width_depth_experiment(
    preset: str, ratios: str, activation: str, p: float, tokens: int, quick: bool,
    out: Path | None, overrides: list[str] | None,
) -> Path:  # fmt: skip
    """Train one arm per width-depth ratio at the preset's budget, measure, write the report."""
    if activation not in GATED:
        raise UserError(f"--activation must be gated ({', '.join(GATED)}); got {activation!r}")
    base = load_config(preset, base_overrides(quick, overrides))
    budget = non_embedding_params(base.model)
    # One checkpoint, at the end: only the final model is measured.
    shared = base_overrides(quick, ["--checkpoint.every", str(base.train.steps),
                                    *(overrides or [])])  # fmt: skip
    shapes = [shape_for_ratio(base.model, budget, r, activation)
              for r in parse_ratios(ratios or DEFAULT_RATIOS)]  # fmt: skip
    out = Path(out) if out else default_out(base, "width-depth", preset, quick)
    arms = build_arms(preset, shared, shapes, activation, out)
    open_experiment(out, {"experiment": "width-depth", "preset": preset, "overrides": shared,
                          "budget": budget, "arms": [a.cfg.run_name for a in arms]})  # fmt: skip
    rows = {}
    for arm in arms:
        run_to_end(arm.cfg)
        path = run_dir(arm.cfg)
        measure(path, p, tokens, last=1)
        m = arm.cfg.model
        rows[arm.cfg.run_name] = {
            "d_model": m.d_model, "n_layers": m.n_layers, "n_heads": m.n_heads, "d_ff": m.d_ff,
            "parameters": non_embedding_params(m), "width-depth ratio": m.d_model / m.n_layers,
            "activation ratio": final_ratio(path),
            "val loss": rx.run_scores(prepare(load_run(path), arm.cfg.run_name))["val loss"],
        }  # fmt: skip
    frame = pd.DataFrame(rows).T.astype(float)
    frame.index.name = "arm"
    return write_width_depth_report(out, frame, budget, p)
