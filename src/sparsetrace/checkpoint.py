"""Checkpoints: ``checkpoints/step_XXXXXXX/{model.safetensors, state.pt}``, written then renamed.

A checkpoint directory appears under its final name only once complete, so a crash or a full disk
while writing leaves the previous checkpoint the latest valid one.
"""

from __future__ import annotations

import os
import pickle
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_file

from sparsetrace.errors import UserError

if TYPE_CHECKING:
    from sparsetrace.config import RunConfig

CKPT_DIR = "checkpoints"


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / CKPT_DIR / f"step_{step:07d}"


def checkpoint_step(path: Path) -> int:
    """``checkpoints/step_0000500`` -> 500."""
    return int(Path(path).name.removeprefix("step_"))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = run_dir / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def save_checkpoint(
    run_dir: Path, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any], keep: int = 0
) -> Path:
    """Write weights (safetensors; tied aliases left out, as ``safetensors.torch.save_model``
    does) and the training state; keep the newest ``keep`` checkpoints (0: all)."""
    final = checkpoint_path(run_dir, step)
    tmp = final.with_name(f".tmp_{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"))
        torch.save(state, tmp / "state.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(run_dir)
        kept = f"; the latest valid checkpoint is {previous[-1]}" if previous else ""
        raise UserError(
            f"could not write checkpoint {final} ({err.strerror or err}){kept}"
        ) from None
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


class CheckpointWriter:
    """Writes checkpoints in the caller's thread, or with ``background`` in one worker thread.

    In the background the caller's state must already be a copy that training will not touch
    (the trainer's CPU copy of a GPU model). One write at a time: a new save waits for the one
    before it, and a failed write raises at the next ``save`` or ``wait``. The rename into place
    still marks a complete checkpoint, so a crash mid-write loses only that one.
    """

    def __init__(self, background: bool = False) -> None:
        self._pool = ThreadPoolExecutor(1, "checkpoint") if background else None
        self._last: Future | None = None

    @property
    def background(self) -> bool:
        return self._pool is not None

    def save(self, run_dir: Path, step: int, weights: dict[str, torch.Tensor],
             state: dict[str, Any], keep: int = 0) -> None:  # fmt: skip
        if self._pool is None:
            save_checkpoint(run_dir, step, weights, state, keep)
            return
        self.wait()
        self._last = self._pool.submit(save_checkpoint, run_dir, step, weights, state, keep)

    def wait(self) -> None:
        """Block until the last write is on disk; re-raise its error."""
        last, self._last = self._last, None
        if last is not None:
            last.result()

    def close(self) -> None:
        """Finish the write in flight (a checkpoint half-written at exit is wasted work)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def load_state(path: Path) -> dict[str, Any]:
    """The training state of a checkpoint (optimizer, tracker, RNG, config); corrupt: UserError."""
    try:
        return torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} is incomplete: state.pt missing") from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as err:
        raise UserError(f"checkpoint {path} is corrupt ({_short(err)})") from None


def load_weights(path: Path, model: torch.nn.Module) -> None:
    """Load a checkpoint's weights into ``model``; missing, corrupt or misfitting: UserError."""
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} is incomplete: model.safetensors missing") from None
    except (SafetensorError, RuntimeError, OSError, ValueError) as err:
        raise UserError(
            f"checkpoint {path} is corrupt or from another model ({_short(err)})"
        ) from None
    if missing or unexpected:
        raise UserError(
            f"checkpoint {path} does not fit this model (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )


def _short(err: BaseException) -> str:
    return str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__


def load_trained_model(
    run_dir: Path, checkpoint: Path | None = None
) -> tuple[torch.nn.Module, RunConfig]:
    """A run's model (latest checkpoint unless one is named) in eval mode, and the run's config."""
    from sparsetrace.config import load_config
    from sparsetrace.model.transformer import Transformer

    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise UserError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = load_config(str(config_file))
    if checkpoint is None:
        ckpts = list_checkpoints(run_dir)
        if not ckpts:
            raise UserError(f"{run_dir}: no checkpoint yet")
        checkpoint = ckpts[-1]
    model = Transformer(cfg.model)
    load_weights(checkpoint, model)
    return model.eval(), cfg
