"""A run prepared for the report: its end-of-training layer table, time series and lifecycle."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from sparsetrace.rundir import Run

SCOPE = "device"  # the paper measures per device (16 x 512 tokens); tables and figures use it
EARLY_FRACTION = 0.2  # Figure 2's "early training" window: the first 20 % of the planned steps...
EARLY_WARMUPS = 2  # ...but at least twice the warm-up, so the window always covers its end
USE_COLUMNS = ("per_token", "per_sequence", "per_batch")
RATIO_COLUMNS = ("token_seq_ratio", "seq_batch_ratio")
LIFECYCLE_COLUMNS = ("on_first_batch", "turned_on", "turned_off", "final_use", "never_used")


def percentile_columns(frame: pd.DataFrame) -> list[str]:
    """The rescaled-percentile columns (p50, p12.5, ...), sorted by percentile."""
    cols = [c for c in frame.columns if c.startswith("p") and c[1:2].isdigit()]
    return sorted(cols, key=lambda c: float(c[1:]))


def lookup(run: Run, section: str | None, key: str) -> Any:
    """A setting from meta.json, else from config.yaml (``section`` None: top level)."""
    for source in (run.meta, run.config):
        node = source.get(section, {}) if section else source
        if isinstance(node, dict) and node.get(key) is not None:
            return node[key]
    return None


def _as_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


@dataclass
class RunData:
    """One run as the report sees it. ``layers`` is indexed by layer, values in percent."""

    run: Run
    label: str
    series: pd.DataFrame  # scope-'device' sparsity rows, one per measured step x layer
    end_step: int | None  # the last step at which every layer was measured
    layers: pd.DataFrame
    transitions: dict[int, pd.DataFrame]  # layer -> step, units_on, off, on, hidden
    notes: list[str] = field(default_factory=list)

    @property
    def warmup_steps(self) -> int | None:
        return _as_int(lookup(self.run, "train", "warmup_steps"))

    @property
    def planned_steps(self) -> int | None:
        return _as_int(self.run.meta.get("steps")) or _as_int(lookup(self.run, "train", "steps"))

    @property
    def layer_ids(self) -> list[int]:
        return [int(i) for i in self.layers.index]

    @property
    def has_metrics(self) -> bool:
        return not self.series.empty

    def early_end(self) -> int | None:
        """Last step of the early-training window (see EARLY_FRACTION), None without metrics."""
        if self.series.empty:
            return None
        last = int(self.series["step"].max())
        total = max(self.planned_steps or 0, last)
        end = max(EARLY_FRACTION * total, EARLY_WARMUPS * (self.warmup_steps or 0))
        return math.ceil(end)


def prepare(run: Run, label: str) -> RunData:
    """Select scope 'device', find the end-of-training step and build the layer table."""
    notes: list[str] = []
    sparsity = run.sparsity
    series = sparsity[sparsity["scope"] == SCOPE] if "scope" in sparsity else sparsity.iloc[:0]
    series = (
        series.drop_duplicates(["step", "layer"], keep="last")
        .sort_values(["step", "layer"])
        .reset_index(drop=True)
    )
    if series.empty and not sparsity.empty:
        notes.append(f"sparsity.csv has no rows of scope '{SCOPE}'")
    end_step = None
    end_rows = series.iloc[:0]
    if not series.empty:
        # A run in progress may be read mid-flush: use the last step with every layer present.
        n_layers = series["layer"].nunique()
        counts = series.groupby("step")["layer"].nunique()
        complete = counts[counts == n_layers]
        end_step = int(complete.index.max() if not complete.empty else counts.index.max())
        end_rows = series[series["step"] == end_step]
        if end_step != int(series["step"].max()):
            notes.append(
                f"the latest measured step {int(series['step'].max())} is incomplete; "
                f"tables use step {end_step}"
            )
    transitions = _transitions(run.lifecycle)
    layers = _layer_table(end_rows, run.lifecycle)
    return RunData(run, label, series, end_step, layers, transitions, notes)


def _layer_table(end_rows: pd.DataFrame, lifecycle: dict[str, Any]) -> pd.DataFrame:
    use = pd.DataFrame(index=pd.Index([], dtype=int, name="layer"))
    if not end_rows.empty:
        end = end_rows.set_index(end_rows["layer"].astype(int))
        use = pd.DataFrame(index=end.index)
        for col in USE_COLUMNS:
            use[col] = end[f"{col}_frac"].astype(float) * 100
        for col in RATIO_COLUMNS:
            use[col] = end[col].astype(float)
        for col in percentile_columns(end):
            use[col] = end[col].astype(float) * 100
    life = pd.DataFrame.from_dict(
        {
            int(k): [100 * float(v.get("summary", {}).get(c, math.nan)) for c in LIFECYCLE_COLUMNS]
            for k, v in lifecycle.get("layers", {}).items()
        },
        orient="index",
        columns=list(LIFECYCLE_COLUMNS),
    )
    # Never used by Table 2's arithmetic, also for lifecycle.json files written before the
    # summary's definition became it (they held "off in every measured batch").
    life["never_used"] = 100.0 - life["on_first_batch"] - life["turned_on"]
    table = use.join(life, how="outer")
    table.index = table.index.astype(int)
    table.index.name = "layer"
    return table.sort_index()


def _transitions(lifecycle: dict[str, Any]) -> dict[int, pd.DataFrame]:
    out = {}
    for key, layer in lifecycle.get("layers", {}).items():
        rows = layer.get("transitions") or []
        frame = pd.DataFrame(rows, columns=["step", "units_on", "off", "on"]).astype(int)
        frame["hidden"] = int(layer.get("hidden", 0)) or np.nan
        out[int(key)] = frame
    return dict(sorted(out.items()))
