"""Run metadata (config.yaml, meta.json) and the progress display of a training run."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from tqdm import tqdm

import sparsetrace
from sparsetrace.config import RunConfig, to_dict
from sparsetrace.device import cpu_arithmetic
from sparsetrace.rundir import atomic_write_text

if TYPE_CHECKING:
    from sparsetrace.train.loop import Session


def git_commit() -> str | None:
    """The commit of the sparsetrace checkout in use, if it is one."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(sparsetrace.__file__).parent,
            capture_output=True, text=True, timeout=5, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def initial_meta(session: Session, command: str, epochs: float) -> dict[str, Any]:
    cfg, m = session.cfg, session.cfg.model
    return {
        "run_name": cfg.run_name,
        "status": "running",
        "step": session.start_step,
        "steps": cfg.train.steps,
        "model": {
            "n_layers": m.n_layers, "d_model": m.d_model, "n_heads": m.n_heads,
            "d_ff": list(m.widths), "activation": m.activation, "style": m.style,
            "bias": m.bias, "norm": m.norm, "pos": m.pos, "vocab_size": m.vocab_size,
            "n_params": session.model.num_params(),
        },
        "data": session.data.info,
        "train": {
            "batch_size": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum,
            "seq_len": cfg.data.seq_len, "tokens_per_step": session.tokens_per_step,
            "lr": cfg.train.lr, "warmup_steps": cfg.train.warmup_steps,
            "epochs": round(epochs, 3), "world_size": session.dist.world_size,
            "parallel": cfg.train.parallel if session.dist.enabled else None,
        },
        "precision": "bf16" if session.amp_dtype == torch.bfloat16 else "fp32",
        "device": str(session.device),
        # What decides a CPU run's rounding (docs/training.md): ATen's kernels (AVX2, AVX512...),
        # MKL's reproducibility branch and the thread count, as the process has them.
        "arithmetic": cfg.train.arithmetic,
        **cpu_arithmetic(),
        "versions": {
            "sparsetrace": sparsetrace.__version__, "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "git_commit": git_commit(),
        "command": command or " ".join(sys.argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "elapsed_s": session.elapsed_s,
    }  # fmt: skip


def write_config_and_meta(run_dir: Path, cfg: RunConfig, meta: dict[str, Any]) -> None:
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    atomic_write_text(run_dir / "meta.json", json.dumps(meta, indent=2))


def update_meta(run_dir: Path, meta: dict[str, Any], **changes: Any) -> None:
    meta.update(changes, updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    atomic_write_text(run_dir / "meta.json", json.dumps(meta, indent=2))


class Progress:
    """A tqdm bar on a terminal; elsewhere (CI, logs) one line per 10% of the run."""

    def __init__(self, total: int, start: int, tokens_per_step: int, enabled: bool = True) -> None:
        self.total, self.tokens_per_step, self.enabled = total, tokens_per_step, enabled
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=start, unit="step", disable=not (self.tty and enabled),
                        dynamic_ncols=True, mininterval=0.5)  # fmt: skip
        self.start_step, self.t0, self.next_line = start, time.perf_counter(), start

    def update(self, done: int, loss: float) -> None:
        elapsed = time.perf_counter() - self.t0
        tok_s = (done - self.start_step) * self.tokens_per_step / max(elapsed, 1e-9)
        if not self.enabled:
            return
        if self.tty:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
        elif done >= self.next_line or done == self.total:
            eta = (self.total - done) * elapsed / max(done - self.start_step, 1)
            print(f"step {done}/{self.total}  loss {loss:.3f}  {tok_s:,.0f} tok/s  "
                  f"eta {eta / 60:.1f} min", file=sys.stderr, flush=True)  # fmt: skip
            self.next_line = done + max(1, self.total // 10)

    def close(self) -> None:
        self.bar.close()
