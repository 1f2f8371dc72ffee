"""Sensitivity sweeps (paper 5, Table 5, Figures 3-4): one run per value of one or more config keys.

``--sweep train.lr=1e-3,2e-3`` sweeps any key (values typed and validated by the config itself;
``;`` between keys makes a grid). Named sweeps reproduce the paper's grids, scaled to the preset:
``lr`` = the paper's peak LRs 1e-3 / 2e-3 / 3e-3 / 5e-3 relative to its standard 3e-3 (5.1,
Table 5); ``width`` = d_ff / 4, d_ff / 2, d_ff (the paper's 8192 / 16384 / 32768, 5.2, Figure 3);
``depth`` = 6 / 10 / 14 layers relative to the paper's 6, at the width sweep's middle width
(5.3, Figure 4). Arms run one after another, or one per process with ``--arm I``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from sparsetrace import paper as published
from sparsetrace.claims import RULES, Verdict
from sparsetrace.claims import rules as r
from sparsetrace.claims.stats import Estimate
from sparsetrace.config import RunConfig, load_config
from sparsetrace.errors import UserError
from sparsetrace.experiments.runs import (
    arm_config,
    base_overrides,
    config_value,
    default_out,
    open_experiment,
    run_dir,
    run_to_end,
    status,
)
from sparsetrace.report import experiments as rx
from sparsetrace.report import write_report as write_runs_report
from sparsetrace.report.document import Section, Table
from sparsetrace.report.findings import end_estimates, end_total
from sparsetrace.report.rundata import prepare
from sparsetrace.rundir import load_run

LR_FACTORS = (1 / 3, 2 / 3, 1.0, 5 / 3)  # the paper's 1e-3, 2e-3, 3e-3, 5e-3 over 3e-3
WIDTH_FACTORS = (1 / 4, 1 / 2, 1.0)  # the paper's d_ff 8192, 16384, 32768 over 32768
DEPTHS = (6, 10, 14)  # the paper's depths, relative to its 6 layers
PAPER_DEPTH = 6
NAMED = ("lr", "width", "depth")

Dim = tuple[str, list[str]]  # a key and its values as written


@dataclass
class Arm:
    index: int
    cfg: RunConfig
    values: dict[str, Any]  # key -> value as the config typed it

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={_fmt(v)}" for k, v in self.values.items())


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ",".join(map(_fmt, value)) + "]"
    return str(value)


def split_values(text: str) -> list[str]:
    """Comma-separated values; commas inside brackets belong to a list value (``[1,2],[3,4]``)."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += char
    values.append(current.strip())
    if any(v == "" for v in values):
        raise UserError(f"--sweep: empty value in {text!r}")
    return values


def parse_sweep(text: str) -> list[Dim]:
    """``KEY=V1,V2[;KEY2=W1,W2]`` -> [(KEY, [V1, V2]), ...]."""
    dims: list[Dim] = []
    for part in text.split(";"):
        key, sep, values = part.partition("=")
        key = key.strip().removeprefix("--")
        if not sep or not key or not values.strip():
            raise UserError(
                f"--sweep: expected KEY=V1,V2,... (e.g. train.lr=1e-3,2e-3), got {part!r}"
            )
        if key in (k for k, _ in dims):
            raise UserError(f"--sweep: key {key} appears twice")
        dims.append((key, split_values(values)))
    return dims


def named_sweep(name: str, base: RunConfig) -> tuple[list[Dim], list[str]]:
    """The paper's grid ``name`` scaled to ``base``: (swept keys, overrides shared by all arms)."""
    if name == "lr":
        return [("train.lr", [f"{base.train.lr * f:.6g}" for f in LR_FACTORS])], []
    widths = [str(max(1, round(base.model.d_ff * f))) for f in WIDTH_FACTORS]
    if name == "width":
        return [("model.d_ff", widths)], []
    if name == "depth":
        depths = [str(max(1, round(base.model.n_layers * d / PAPER_DEPTH))) for d in DEPTHS]
        return [("model.n_layers", depths)], ["--model.d_ff", widths[len(widths) // 2]]
    raise UserError(f"unknown sweep name {name!r}; choose one of {', '.join(NAMED)}")


def build_arms(preset: str, shared: list[str], dims: list[Dim], out: Path) -> list[Arm]:
    """One validated config per combination of values (the grid), named by its typed values."""
    arms: list[Arm] = []
    for combo in itertools.product(*[[(key, v) for v in values] for key, values in dims]):
        own = [item for key, value in combo for item in (f"--{key}", value)]
        cfg = arm_config(preset, [*shared, *own], out, "arm")
        values = {key: config_value(cfg, key) for key, _ in combo}
        cfg.run_name = "+".join(f"{k}={_fmt(v)}" for k, v in values.items()).replace("/", "_")
        if any(a.cfg.run_name == cfg.run_name for a in arms):
            raise UserError(f"--sweep: two values give the same arm {cfg.run_name}")
        arms.append(Arm(len(arms), cfg, values))
    return arms


def run_sweep(
    preset: str, sweep: str, name: str, arm: int, list_arms: bool, quick: bool,
    out: Path | None, overrides: list[str] | None,
) -> Path | None:  # fmt: skip
    """Train (or finish) the arms, or only arm ``arm``, or list them; the report when all ran."""
    if bool(sweep) == bool(name):
        raise UserError(f"give either --sweep KEY=V1,V2,... or --name {'|'.join(NAMED)}")
    shared = base_overrides(quick, overrides)
    base = load_config(preset, shared)
    dims, fixed = named_sweep(name, base) if name else (parse_sweep(sweep), [])
    shared = [*shared, *fixed]
    label = name or "+".join(key for key, _ in dims)
    out = Path(out) if out else default_out(base, f"sweep-{label}", preset, quick)
    arms = build_arms(preset, shared, dims, out)
    if list_arms:
        for a in arms:
            print(f"{a.index}\t{status(run_dir(a.cfg), a.cfg.train.steps)}\t{a.label}")
        return None
    if not -1 <= arm < len(arms):
        raise UserError(f"--arm must be an arm index 0-{len(arms) - 1} (see --list), got {arm}")
    plan = {"experiment": "sweep", "preset": preset, "overrides": shared,
            "arms": [a.cfg.run_name for a in arms]}  # fmt: skip
    open_experiment(out, plan)
    for a in arms if arm == -1 else [arms[arm]]:
        run_to_end(a.cfg)
    if arm != -1:
        print("once every arm has run, the same command without --arm writes the report")
        return None
    index = write_report(out, [k for k, _ in dims], arms)
    print(f"report: {index}")
    return index


# --------------------------------------------------------------------------------------------------
# Report


def final_layers(run: Path) -> pd.DataFrame:
    """Per layer at the last measured step: per-token and per-batch use (% of the layer), and
    units (per_batch_units, hidden) for hidden-unit-weighted totals."""
    rd = prepare(load_run(run), run.name)
    end = rd.series[rd.series["step"] == rd.end_step].set_index("layer").sort_index()
    return pd.DataFrame({
        "per_token": 100 * end["per_token_frac"], "per_batch": 100 * end["per_batch_frac"],
        "per_batch_units": end["per_batch"], "hidden": end["hidden"],
    }).astype(float)  # fmt: skip


def _by_layer(layers: dict[str, pd.DataFrame], column: str) -> pd.DataFrame:
    """Layers x arms of ``column``, plus the hidden-unit-weighted total row for per-batch use."""
    frame = pd.DataFrame({label: t[column] for label, t in layers.items()})
    frame.index = frame.index.astype(int).astype(str)
    if column == "per_batch":
        frame.loc["total"] = [
            100 * t["per_batch_units"].sum() / t["hidden"].sum() for t in layers.values()
        ]
    frame.index.name = "layer"
    return frame


def _paper_table5() -> pd.DataFrame:
    cols = {
        f"LR={lr:g}": [*values, total] for lr, (values, total) in sorted(published.TABLE5.items())
    }
    return pd.DataFrame(cols, index=[*map(str, range(6)), "total"])


# The paper's claims a one-key sweep can check: swept key -> rule keys.
SWEEP_CLAIMS = {
    "train.lr": ("lr_first_fewest", "lr_top_two_most", "lr_use_falls"),
    "model.d_ff": ("width_use_falls",),
    "model.n_layers": ("depth_batch_use_rises",),
}


def _paper_lr_verdicts() -> dict[str, Verdict]:
    """The LR claims applied to the paper's Table 5 (printed values, taken as exact)."""
    arms = {lr: {k: Estimate(v) for k, v in enumerate(values)} for lr, (values, _) in
            sorted(published.TABLE5.items())}  # fmt: skip
    totals = [(lr, Estimate(total)) for lr, (_, total) in published.TABLE5.items()]
    return {
        "lr_first_fewest": r.every_arm({f"LR={lr:g}": r.layer_extreme(v, 0, False, "use")
                                        for lr, v in arms.items()}),
        "lr_top_two_most": r.every_arm({f"LR={lr:g}": r.top_two_most(v)
                                        for lr, v in arms.items()}),
        "lr_use_falls": r.order_with({"all layers": totals,
                                      "layer 0": [(lr, v[0]) for lr, v in arms.items()]},
                                     rising=False),
    }  # fmt: skip


def _claims(key: str, arms: list[Arm], dirs: dict[str, Path]) -> Table | None:
    """The paper's claims about this sweep's key, decided on the arms (None: no claim)."""
    if key not in SWEEP_CLAIMS or any(len(a.values) != 1 for a in arms):
        return None
    rds = {a.label: prepare(load_run(dirs[a.label]), a.label) for a in arms}
    value = {a.label: float(a.values[key]) for a in arms}
    batch = {label: end_estimates(rd, "per_batch_frac") for label, rd in rds.items()}
    total = {label: end_total(rd, "per_batch") for label, rd in rds.items()}
    token = {label: end_total(rd, "per_token") for label, rd in rds.items()}
    verdicts: dict[str, Verdict] = {
        "lr_first_fewest": r.every_arm({
            k: r.layer_extreme(v, min(v, default=0), False, "per-batch use")
            for k, v in batch.items()}),
        "lr_top_two_most": r.every_arm({k: r.top_two_most(v) for k, v in batch.items()}),
        "lr_use_falls": r.order_with({
            "all layers": [(value[k], v) for k, v in total.items()],
            "layer 0": [(value[k], v[min(v)]) for k, v in batch.items() if v],
        }, rising=False),
        "width_use_falls": r.order_with({
            "per token": [(value[k], v) for k, v in token.items()],
            "per batch": [(value[k], v) for k, v in total.items()],
        }, rising=False),
        "depth_batch_use_rises": r.order_with({
            "per batch": [(value[k], v) for k, v in total.items()]}, rising=True),
    }  # fmt: skip
    paper = _paper_lr_verdicts() if key == "train.lr" else {}
    rows = {
        RULES[k].claim: {
            "where": RULES[k].source, "rule": RULES[k].line,
            "paper": paper.get(k) or RULES[k].no_data(f"{RULES[k].source}: plots only"),
            "this sweep": verdicts[k],
        }
        for k in SWEEP_CLAIMS[key]
    }  # fmt: skip
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "claim (the paper's words)"
    return Table(
        "sweep_claims", "The paper's claims checked on this sweep",
        "Each claim decided by its rule (docs/verdicts.md) on end-of-training values (mean ± "
        "standard error over the last 10 % of each arm); the paper column applies the same rule "
        "to Table 5 where it publishes numbers.", frame,
    )  # fmt: skip


def _figure_title(keys: list[str]) -> str:
    paper = {"model.d_ff": "Figure 3: ", "model.n_layers": "Figure 4: ", "train.lr": "Table 5: "}
    prefix = paper.get(keys[0], "") if len(keys) == 1 else ""
    return f"{prefix}units used per token and per batch by {' × '.join(keys)}"


def write_report(out: Path, keys: list[str], arms: list[Arm]) -> Path:
    """Table 5 (per-batch use per layer per arm, weighted totals), per-token use, Figures 3-4,
    final scores, and every arm's full run report."""
    report = out / "report"
    dirs = {a.label: run_dir(a.cfg) for a in arms}
    layers = {label: final_layers(path) for label, path in dirs.items()}
    per_batch = _by_layer(layers, "per_batch")
    lr_only = keys == ["train.lr"]
    if lr_only:  # the paper's Table 5 beside it
        per_batch = pd.concat({"this sweep": per_batch, "paper (Table 5)": _paper_table5()}, axis=1)
        layer_ids = sorted((i for i in per_batch.index if i != "total"), key=int)
        per_batch = per_batch.reindex([*layer_ids, "total"])
        per_batch.index.name = "layer"
    pct = {c: (lambda v: f"{v:.1f}") for c in per_batch.columns.get_level_values(-1)}
    table5 = Table(
        "table5", "Table 5: hidden units used per batch (%)" if lr_only
        else f"Hidden units used per batch (%) by {' × '.join(keys)}",
        "Per-batch use at each arm's last measured step, % of the layer's units; total = "
        "hidden-unit-weighted mean over layers (used units / all units)."
        + (" The named lr sweep scales the paper's LRs by the preset's LR / 3e-3." if lr_only
           else ""),
        per_batch, pct, shaded="paper (Table 5)" if lr_only else None,
    )  # fmt: skip
    per_token = _by_layer(layers, "per_token")
    token_table = Table(
        "per_token", "Hidden units used per token (%)",
        "Mean over the batch's tokens at each arm's last measured step, % of the layer's units.",
        per_token, {c: (lambda v: f"{v:.2f}") for c in per_token.columns},
    )  # fmt: skip
    title = _figure_title(keys)
    figure = rx.figure_block(
        report / "figures", "use_by_layer", title,
        "Per-token (left) and per-batch (right) use at the end of training, per layer, one line "
        "per arm. The paper's Figures 3-4 show the same for d_ff 8192/16384/32768 and for "
        "6/10/14 layers at d_ff 16384: wider models are sparser; deeper ones use more per batch.",
        rx.use_by_layer_figure(
            layers, {"per_token": "units used per token (%)",
                     "per_batch": "units used per batch (%)"}, " × ".join(keys),
        ),
    )  # fmt: skip
    scores = pd.DataFrame({label: rx.run_scores(prepare(load_run(p), label))
                           for label, p in dirs.items()}).T  # fmt: skip
    scores.index.name = "arm"
    runs_index = write_runs_report(list(dirs.values()), report / "runs")
    claims = _claims(keys[0], arms, dirs) if len(keys) == 1 else None
    sections = [
        *([Section("claims", "The paper's claims", [claims])] if claims else []),
        Section("table5", "Per-batch use per layer", [table5]),
        Section("per_token", "Per-token use per layer", [token_table]),
        Section("figure", "Use by layer", [figure]),
        Section("scores", "Final loss per arm", [rx.scores_table("sweep_scores", scores)]),
        rx.runs_link_section("Every arm in full", runs_index, report),
    ]  # fmt: skip
    return rx.write_document(
        report,
        f"Sensitivity sweep over {' × '.join(keys)} (Wild & Anderson §5)",
        f"{len(arms)} arms: " + "; ".join(dirs),
        sections,
    )
