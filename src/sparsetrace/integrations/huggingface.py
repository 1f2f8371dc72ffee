"""Trace sparsity over training inside a Hugging Face ``transformers.Trainer``.

    from sparsetrace.integrations.huggingface import attach
    trainer = Trainer(model=model, args=args, train_dataset=...)
    attach(trainer, every=20)                # writes OUTPUT_DIR/sparsetrace/, a run directory
    trainer.train()                          # then: sparsetrace report OUTPUT_DIR/sparsetrace

Each optimizer step ``state.global_step`` (updates done so far) is measured on its first
micro-batch when due (:class:`sparsetrace.Recorder`). The recorder's state goes into every
checkpoint the Trainer saves (``checkpoint-N/sparsetrace_recorder.pt``), so
``trainer.train(resume_from_checkpoint=...)`` continues the lifecycle exactly. Attached with
:func:`attach`, the per-layer use of each measured step is also logged through
``trainer.log`` — to whatever ``report_to`` chose (TensorBoard, Weights & Biases, ...).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from sparsetrace.recording import Recorder, merge_meta

log = logging.getLogger(__name__)
STATE_FILE = "sparsetrace_recorder.pt"
TRAIN_KEYS = {"loss": "loss", "learning_rate": "lr", "grad_norm": "grad_norm"}


class SparsityCallback(TrainerCallback):
    """A ``TrainerCallback`` that records hidden-unit use into the run directory ``run_dir``
    (default ``args.output_dir/sparsetrace``). The keyword arguments are
    :class:`sparsetrace.Recorder`'s (``every``, ``layers``, ``gated``, ``modules``,
    ``percentiles``, ``tokens_per_step``, ``meta``, ``tensorboard``)."""

    def __init__(self, run_dir: str | Path | None = None, trainer: Any = None, **options: Any):
        self.run_dir, self.options = run_dir, options
        self.trainer = trainer  # set by attach(): sparsity also goes through trainer.log
        self.recorder: Recorder | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs) -> None:
        model = getattr(model, "module", model)  # DDP / DataParallel wrappers
        run_dir = Path(self.run_dir or Path(args.output_dir) / "sparsetrace")
        resume = state.global_step > 0
        # transformers 5 takes a warm-up ratio in warmup_steps (< 1); get_warmup_steps resolves it
        if hasattr(args, "get_warmup_steps"):
            warmup = args.get_warmup_steps(state.max_steps)
        else:  # transformers 4: a separate warmup_ratio
            warmup = args.warmup_steps or math.ceil(args.warmup_ratio * state.max_steps)
        train = {"steps": state.max_steps, "warmup_steps": warmup, "lr": args.learning_rate,
                 "grad_accum": args.gradient_accumulation_steps,
                 "batch_size": args.per_device_train_batch_size}  # fmt: skip
        options = dict(self.options)
        meta = merge_meta(
            {"train": train, "trainer": "transformers.Trainer"}, options.pop("meta", None)
        )
        self.recorder = Recorder(model, run_dir, meta=meta, resume=resume, **options)
        if resume:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE
            if ckpt.is_file():
                self.recorder.load_state_dict(torch.load(ckpt, weights_only=False),
                                              state.global_step)  # fmt: skip
            else:
                log.warning(
                    "sparsetrace: resuming at step %d without %s: the lifecycle starts here and "
                    "rows from this step on are not dropped from %s",
                    state.global_step,
                    ckpt,
                    run_dir,
                )

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        self.recorder.begin(state.global_step)

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if self.recorder.end() is not None and self.trainer is not None:
            # trainer.log's on_log clears control.should_log, which the Trainer's own flow set
            # for this step: keep it, or this log would silently replace the Trainer's.
            pending = control.should_log
            self.trainer.log(self.recorder.latest())
            control.should_log = pending

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if self.recorder is None or not logs:
            return
        # train.csv's step is the step just done (updates before it); eval.csv's the updates
        # done, as in sparsetrace's own logs. global_step already counts the step just done.
        train = {TRAIN_KEYS[k]: v for k, v in logs.items() if k in TRAIN_KEYS}
        if train:
            self.recorder.log(state.global_step - 1, **train)
        evals = {k.replace("eval_", "val_"): v for k, v in logs.items()
                 if k.startswith("eval_") and isinstance(v, int | float)}  # fmt: skip
        if evals:
            self.recorder.log_eval(state.global_step, **evals)

    def on_save(self, args, state, control, **kwargs) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.recorder is not None and self.recorder.is_main and folder.is_dir():
            torch.save(self.recorder.state_dict(), folder / STATE_FILE)

    def on_train_end(self, args, state, control, **kwargs) -> None:
        if self.recorder is not None:
            self.recorder.close()


def attach(trainer: Any, **kwargs: Any) -> SparsityCallback:
    """Add a :class:`SparsityCallback` to ``trainer`` that also logs through ``trainer.log``."""
    callback = SparsityCallback(trainer=trainer, **kwargs)
    trainer.add_callback(callback)
    return callback
