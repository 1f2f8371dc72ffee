"""What every experiment shares: its directory and plan, arm configs, and arms run to the end once.

An experiment directory holds ``experiment.json`` (the arguments that define the experiment),
one run directory per arm and ``report/``. Re-invoking an experiment trains only what is missing:
a finished arm is left as it is, an interrupted arm resumes from its newest checkpoint, a new arm
starts (or is *forked*: seeded with another run's checkpoint and logs, then resumed). A directory
holding another experiment is refused, so a changed option never mixes two experiments.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from functools import reduce
from pathlib import Path
from typing import Any

from sparsetrace.checkpoint import checkpoint_path, list_checkpoints, load_state
from sparsetrace.config import RunConfig, load_config
from sparsetrace.errors import UserError
from sparsetrace.rundir import atomic_write_text, lifecycle_json
from sparsetrace.tracking import LifecycleTracker
from sparsetrace.train.loop import train

PLAN_FILE = "experiment.json"
LOGS = ("train.csv", "eval.csv", "sparsity.csv")

# --quick: a 4-layer byte-level model, 300 steps (about 15 s a run on 2 CPU cores). Its high
# peak LR makes about a quarter of the units of layers 1-3 go unused per batch within 50 steps
# (at 3e-3 almost none do in 300 steps: the LR drives unit death, cf. the paper's Table 5).
QUICK_OVERRIDES = [
    "--model.n_layers", "4", "--model.d_model", "64", "--model.n_heads", "4",
    "--model.d_ff", "512", "--data.tokenizer", "bytes", "--data.seq_len", "64",
    "--train.batch_size", "8", "--train.lr", "1e-2", "--train.steps", "300",
    "--train.warmup_steps", "30", "--trace.every", "10", "--eval.every", "50",
    "--eval.batches", "4", "--checkpoint.every", "100",
]  # fmt: skip

Seeder = Callable[[Path], None]


def base_overrides(quick: bool, overrides: list[str] | None) -> list[str]:
    """The quick scale (if asked for) under the user's own overrides."""
    return [*(QUICK_OVERRIDES if quick else []), *(overrides or [])]


def arm_config(preset: str, overrides: list[str], out: Path, name: str) -> RunConfig:
    """One arm's validated config, its run directory ``out/name``."""
    return load_config(preset, [*overrides, "--out_dir", str(out), "--run_name", name])


def config_value(cfg: RunConfig, key: str) -> Any:
    """The value at a dotted key, e.g. ``train.lr``."""
    return reduce(getattr, key.split("."), cfg)


def default_out(cfg: RunConfig, kind: str, preset: str, quick: bool) -> Path:
    return Path(cfg.out_dir) / f"{kind}-{Path(preset).stem}{'-quick' if quick else ''}"


def open_experiment(out: Path, plan: dict[str, Any]) -> None:
    """Create ``out`` for ``plan``, or check that the experiment already in it is this one."""
    path = out / PLAN_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        if saved != plan:
            diff = sorted(k for k in set(saved) | set(plan) if saved.get(k) != plan.get(k))
            raise UserError(
                f"{out} holds another experiment (differs in: {', '.join(diff)}); "
                "pass --out DIR for a new one"
            )
        return
    # Hidden names are temporary files: another process (--arm) may be writing the plan.
    if out.exists() and any(not p.name.startswith(".") for p in out.iterdir()):
        raise UserError(f"{out} exists and is not an experiment directory; pass --out DIR")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(plan, indent=2))


def run_dir(cfg: RunConfig) -> Path:
    return Path(cfg.out_dir) / cfg.run_name


def status(path: Path, steps: int) -> str:
    """'finished', 'partial' (has a checkpoint to resume from) or 'pending'."""
    meta = path / "meta.json"
    if meta.exists():
        info = json.loads(meta.read_text())
        if info.get("status") == "finished" and info.get("step") == steps:
            return "finished"
    return "partial" if list_checkpoints(path) else "pending"


def run_to_end(cfg: RunConfig, seed: Seeder | None = None) -> Path:
    """Train one arm to its last step, once: finished is kept, interrupted resumes, new starts.

    ``seed`` writes a new arm's starting point (a checkpoint and the logs before it) into an
    empty directory; it is built aside and renamed into place, so a crash never leaves half a
    fork behind.
    """
    path = run_dir(cfg)
    state = status(path, cfg.train.steps)
    print(f"{path}: {state}", flush=True)
    if state == "finished":
        return path
    if state == "partial":
        return train(cfg, resume=True)
    # Killed before its first checkpoint (or its seeding): nothing in it is worth keeping.
    shutil.rmtree(path, ignore_errors=True)
    if seed is None:
        return train(cfg)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    seed(tmp)
    os.replace(tmp, path)
    return train(cfg, resume=True)


def copy_history(source: Path, dest: Path, tracker_state: dict[str, Any]) -> None:
    """A run's logs (resuming drops their rows from the checkpoint's step on) and the lifecycle
    of the tracker state the new run starts from."""
    for name in LOGS:
        if (source / name).exists():
            shutil.copy2(source / name, dest / name)
    tracker = LifecycleTracker()
    tracker.load_state_dict(tracker_state)
    atomic_write_text(dest / "lifecycle.json", json.dumps(lifecycle_json(tracker)))


def fork(source: Path, step: int) -> Seeder:
    """Seed a new arm with ``source``'s checkpoint after ``step`` updates and its logs before it:
    resumed, the arm replays ``source`` exactly up to ``step`` and then follows its own config."""

    def seed(dest: Path) -> None:
        ckpt = checkpoint_path(source, step)
        if not ckpt.is_dir():
            raise UserError(f"cannot fork from {source}: it has no checkpoint at step {step}")
        shutil.copytree(ckpt, checkpoint_path(dest, step))
        copy_history(source, dest, load_state(ckpt)["tracker"])

    return seed
