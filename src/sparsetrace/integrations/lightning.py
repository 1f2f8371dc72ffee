"""Trace sparsity over training inside a Lightning ``Trainer``.

    from sparsetrace.integrations.lightning import SparsityCallback
    trainer = L.Trainer(max_steps=1000, callbacks=[SparsityCallback("runs/mine", every=20)])
    trainer.fit(module, loader)              # then: sparsetrace report runs/mine

The callback finds the MLPs in the ``LightningModule`` (a sparsetrace ``Transformer`` or a
Hugging Face model held as an attribute, or ``modules=[...]`` relative to the LightningModule).
Each optimizer step ``trainer.global_step`` (updates done so far) is measured on its first
micro-batch when due (:class:`sparsetrace.Recorder`); the per-layer use of each measured step
is also logged with ``pl_module.log_dict``, so it reaches the Trainer's loggers. The recorder's
state is the callback's ``state_dict``: Lightning saves it in every checkpoint, and
``trainer.fit(..., ckpt_path=...)`` continues the lifecycle exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from sparsetrace.recording import Recorder, merge_meta


class SparsityCallback(pl.Callback):
    """A Lightning ``Callback`` that records hidden-unit use into the run directory ``run_dir``
    (default ``trainer.default_root_dir/sparsetrace``). ``warmup_steps`` goes into meta.json
    (the report's "when do units die" compares the warm-up with the rest); the other keyword
    arguments are :class:`sparsetrace.Recorder`'s (``every``, ``layers``, ``gated``,
    ``modules``, ``percentiles``, ``tokens_per_step``, ``meta``, ``tensorboard``)."""

    def __init__(
        self, run_dir: str | Path | None = None, warmup_steps: int | None = None, **options: Any
    ) -> None:
        self.run_dir, self.warmup_steps, self.options = run_dir, warmup_steps, options
        self.recorder: Recorder | None = None
        self._pending: Mapping[str, Any] | None = None  # recorder state from a checkpoint
        self._step: int | None = None  # the optimizer step whose micro-batches are running
        self._loss: torch.Tensor | None = None  # the step's loss so far

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        steps = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        train = {"steps": int(steps), "warmup_steps": self.warmup_steps,
                 "grad_accum": trainer.accumulate_grad_batches}  # fmt: skip
        options = dict(self.options)
        meta = merge_meta(
            {"train": train, "trainer": "lightning.Trainer"}, options.pop("meta", None)
        )
        run_dir = Path(self.run_dir or Path(trainer.default_root_dir) / "sparsetrace")
        resume = self._pending is not None and step > 0
        self.recorder = Recorder(pl_module, run_dir, meta=meta, resume=resume, **options)
        if resume:
            self.recorder.load_state_dict(self._pending, step)
        self._pending, self._step = None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self._step:  # micro-batch 0 of a new optimizer step
            self._step = trainer.global_step
            self._loss = None
            self.recorder.begin(self._step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.recorder.end() is not None:  # once per step: begin() re-arms the next one
            pl_module.log_dict(self.recorder.latest(), on_step=True, on_epoch=False)
        # Lightning hands over each micro-batch's loss divided by accumulate_grad_batches: their
        # sum is the step's mean loss (kept on the device: no synchronisation until logged).
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):
            self._loss = loss.detach() if self._loss is None else self._loss + loss.detach()
        done = trainer.global_step - 1  # the step just done, if this micro-batch finished it
        if (
            trainer.global_step != self._step
            and trainer.global_step % trainer.log_every_n_steps == 0
            and self._loss is not None
        ):
            self.recorder.log(done, loss=float(self._loss))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.recorder is None or trainer.sanity_checking:
            return
        evals = {k.replace("/", "_"): float(v) for k, v in trainer.callback_metrics.items()
                 if k.startswith("val") and v.numel() == 1}  # fmt: skip
        if evals:
            self.recorder.log_eval(trainer.global_step, **evals)

    def state_dict(self) -> dict[str, Any]:
        return {"recorder": self.recorder.state_dict()} if self.recorder is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("recorder")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.recorder is not None:
            self.recorder.close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self.recorder is not None:
            self.recorder.close(finished=False)
