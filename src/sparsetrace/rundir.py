"""The run directory: what training (or analysis) writes and what the report reads.

Layout (docs/run-directory.md has the column reference):
    config.yaml      resolved configuration
    meta.json        versions, git commit, command line, corpus, model size, status
    sparsity.csv     one row per measured step x layer x scope (append-only, flushed per interval)
    train.csv        one row per optimizer step: loss, lr, grad norm, step time
    eval.csv         one row per evaluation: validation loss, perplexity, next-token accuracy
    lifecycle.json   the lifecycle tracker's per-layer summary and on/off transitions
    tb/              TensorBoard scalars
    checkpoints/     step_XXXXXXX/ directories (see sparsetrace.checkpoint)
Only rank 0 writes; every file is either append-only CSV or replaced atomically.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from sparsetrace.errors import UserError
from sparsetrace.metrics import UseStats
from sparsetrace.tracking import LifecycleTracker

SPARSITY_BASE_COLUMNS = [
    "step", "tokens", "layer", "name", "scope", "hidden",
    "per_token", "per_sequence", "per_batch",
    "per_token_frac", "per_sequence_frac", "per_batch_frac",
    "token_seq_ratio", "seq_batch_ratio",
]  # fmt: skip
TRAIN_COLUMNS = ["step", "tokens", "lr", "loss", "grad_norm", "step_time_s"]
EVAL_COLUMNS = ["step", "tokens", "val_loss", "val_ppl", "val_acc"]
SPARSING_LAW_COLUMNS = ["step", "tokens", "layer", "activation_ratio", "cett", "ppl_ratio"]


def percentile_column(p: float) -> str:
    """Column name of a rescaled percentile: 50 -> 'p50', 12.5 -> 'p12.5'."""
    return f"p{p:g}"


def atomic_write_text(path: Path, text: str) -> None:
    """Write-then-rename, so a crash or a full disk never leaves a half-written file behind."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _CsvLog:
    """Append-only CSV with a fixed header; on resume, rows with ``step >= keep_below`` go.

    ``step`` is always the number of optimizer updates applied before the row was measured, so a
    run resumed from the checkpoint after N updates recomputes every row from step N on.
    """

    def __init__(self, path: Path, columns: Sequence[str], keep_below: int | None) -> None:
        self.path, self.columns = path, list(columns)
        if keep_below is not None and path.exists():
            kept = [r for r in _read_rows(path) if int(float(r["step"])) < keep_below]
            lines = [",".join(self.columns)] + [
                ",".join(r.get(c, "") for c in self.columns) for r in kept
            ]
            atomic_write_text(path, "\n".join(lines) + "\n")
        new = not path.exists() or path.stat().st_size == 0
        self.file = open(path, "a", newline="")  # noqa: SIM115 (held open for appends)
        self.writer = csv.writer(self.file)
        if new:
            self.writer.writerow(self.columns)
            self.file.flush()

    def write(self, rows: Sequence[Mapping[str, Any]]) -> None:
        for row in rows:
            self.writer.writerow([_fmt(row.get(c)) for c in self.columns])
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.8g}"
    return str(value)


class RunWriter:
    """Rank-0 writer of a run directory's logs. ``resume_step`` drops rows logged after it."""

    def __init__(
        self,
        run_dir: Path,
        percentiles: Sequence[float],
        resume_step: int | None = None,
        tensorboard: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.percentiles = list(percentiles)
        cols = SPARSITY_BASE_COLUMNS + [percentile_column(p) for p in self.percentiles]
        self.sparsity = _CsvLog(self.run_dir / "sparsity.csv", cols, resume_step)
        self.train = _CsvLog(self.run_dir / "train.csv", TRAIN_COLUMNS, resume_step)
        # The evaluation after N updates is part of the checkpoint's past: it is kept.
        keep_eval = None if resume_step is None else resume_step + 1
        self.eval = _CsvLog(self.run_dir / "eval.csv", EVAL_COLUMNS, keep_eval)
        self.resume_step = resume_step
        self.sparsing_law: _CsvLog | None = None  # created on first use (off by default)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=resume_step)

    def log_sparsity(
        self,
        step: int,
        tokens: int,
        stats: Mapping[str, UseStats],
        scope: str = "device",
    ) -> None:
        """One row per layer; ``stats`` maps the layer's stable name to its single-layer stats."""
        rows = []
        for name, s in stats.items():
            row: dict[str, Any] = {
                "step": step, "tokens": tokens, "layer": layer_index(name), "name": name,
                "scope": scope, "hidden": s.hidden,
                "per_token": float(s.per_token), "per_sequence": float(s.per_sequence),
                "per_batch": float(s.per_batch),
                "per_token_frac": float(s.per_token_frac),
                "per_sequence_frac": float(s.per_sequence_frac),
                "per_batch_frac": float(s.per_batch_frac),
                "token_seq_ratio": float(s.token_seq_ratio),
                "seq_batch_ratio": float(s.seq_batch_ratio),
            }  # fmt: skip
            for p, v in s.percentiles.items():
                row[percentile_column(p)] = float(v)
            rows.append(row)
            if self.tb is not None:
                for key in ("per_token_frac", "per_sequence_frac", "per_batch_frac"):
                    self.tb.add_scalar(f"sparsity/{scope}/{name}/{key}", row[key], step)
        self.sparsity.write(rows)

    def log_train(self, row: Mapping[str, Any]) -> None:
        self.train.write([row])
        self._tb_scalars("train", row)

    def log_eval(self, row: Mapping[str, Any]) -> None:
        self.eval.write([row])
        self._tb_scalars("eval", row)

    def _tb_scalars(self, prefix: str, row: Mapping[str, Any]) -> None:
        if self.tb is None:
            return
        for key, value in row.items():
            if key not in ("step", "tokens") and value is not None:
                self.tb.add_scalar(f"{prefix}/{key}", float(value), int(row["step"]))

    def log_sparsing_law(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """PPL-p% activation ratio rows measured during training (``sparsing_train.csv``)."""
        if self.sparsing_law is None:
            keep = None if self.resume_step is None else self.resume_step + 1
            self.sparsing_law = _CsvLog(
                self.run_dir / "sparsing_train.csv", SPARSING_LAW_COLUMNS, keep
            )
        self.sparsing_law.write(rows)

    def write_lifecycle(self, tracker: LifecycleTracker) -> None:
        atomic_write_text(self.run_dir / "lifecycle.json", json.dumps(lifecycle_json(tracker)))

    def close(self) -> None:
        for log in (self.sparsity, self.train, self.eval, self.sparsing_law):
            if log is not None:
                log.close()
        if self.tb is not None:
            self.tb.close()


def layer_index(name: str) -> int:
    """``blocks.3.mlp.hidden`` -> 3: the index that aligns layers across runs and tables."""
    parts = name.split(".")
    for part in parts:
        if part.isdigit():
            return int(part)
    raise ValueError(f"layer name {name!r} holds no layer index")


def lifecycle_json(tracker: LifecycleTracker) -> dict[str, Any]:
    return {
        "layers": {
            str(layer_index(name)): {
                "name": name,
                "hidden": lc.hidden,
                "summary": lc.summary(),
                "transitions": [list(t) for t in lc.transitions],
                "last_step_used": lc.last_step_used.tolist(),
            }
            for name, lc in tracker.layers.items()
        }
    }


@dataclass
class Run:
    """Everything a run directory holds, loaded; ``missing`` names the parts not there yet."""

    path: Path
    config: dict[str, Any]
    meta: dict[str, Any]
    sparsity: pd.DataFrame
    train: pd.DataFrame
    eval: pd.DataFrame
    lifecycle: dict[str, Any]
    missing: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.meta.get("run_name") or self.path.name)

    @property
    def percentiles(self) -> list[float]:
        return [
            float(c[1:]) for c in self.sparsity.columns if c.startswith("p") and c[1:2].isdigit()
        ]


def load_metrics(run_dir: Path | str) -> pd.DataFrame:
    """The sparsity log as a DataFrame: one row per measured step x layer x scope."""
    return load_run(run_dir).sparsity


def load_run(run_dir: Path | str) -> Run:
    """Load a run directory (finished, in progress or partial). Not a run directory: UserError."""
    path = Path(run_dir)
    if not path.is_dir():
        raise UserError(f"{path}: no such run directory")
    known = ("config.yaml", "meta.json", "sparsity.csv", "train.csv", "eval.csv")
    if not any((path / f).exists() for f in known):
        raise UserError(f"{path}: not a sparsetrace run directory (none of {', '.join(known)})")
    missing: list[str] = []

    def frame(fname: str, columns: Sequence[str]) -> pd.DataFrame:
        f = path / fname
        if not f.exists() or f.stat().st_size == 0:
            missing.append(fname)
            return pd.DataFrame(columns=list(columns))
        try:
            return pd.read_csv(f)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
            raise UserError(f"{f}: unreadable CSV ({err})") from None

    def structured(fname: str, loader: Any) -> dict[str, Any]:
        f = path / fname
        if not f.exists():
            missing.append(fname)
            return {}
        try:
            return loader(f.read_text()) or {}
        except (ValueError, yaml.YAMLError) as err:
            raise UserError(f"{f}: unreadable ({err})") from None

    return Run(
        path=path,
        config=structured("config.yaml", yaml.safe_load),
        meta=structured("meta.json", json.loads),
        sparsity=frame("sparsity.csv", SPARSITY_BASE_COLUMNS),
        train=frame("train.csv", TRAIN_COLUMNS),
        eval=frame("eval.csv", EVAL_COLUMNS),
        lifecycle=structured("lifecycle.json", json.loads),
        missing=missing,
    )
