"""Record hidden-unit use over training in *your own* training loop: :class:`Recorder`.

Attach a recorder to any model :func:`sparsetrace.trace` supports (ours, Hugging Face GPT-2,
OPT, GPT-NeoX, Llama/Mistral/Qwen2, or explicit module paths), call :meth:`Recorder.step`
around each optimizer step's forward pass, and it writes the standard run directory
(``sparsity.csv``, ``lifecycle.json``, ``meta.json``, TensorBoard scalars; ``train.csv`` /
``eval.csv`` for what you log through it), so ``sparsetrace report RUN`` writes the papers'
tables and figures for a run trained elsewhere::

    rec = sparsetrace.Recorder(model, "runs/mine", every=20)
    for step, batch in enumerate(loader):      # step = optimizer updates done so far
        with rec.step(step):                   # measures the first forward inside, if due
            loss = model(**batch).loss
        loss.backward(); opt.step(); opt.zero_grad()
        rec.log(step, loss=loss.item())        # optional: train.csv
    rec.close()

**What is measured.** Step 0 and every ``every``-th optimizer step, the *first* forward pass
inside ``step()`` — with gradient accumulation, micro-batch 0, one device batch, as the paper
measures (and as sparsetrace's own trainer does). Under torchrun (DDP, FSDP2) every rank
measures its own batch: rows of scope ``device`` are rank 0's, rows of scope ``global`` the union
over ranks (every rank must call ``step()`` on the same steps: the union is a collective); only
rank 0 writes.

**Cost.** On unmeasured steps the hooks return at once: no tensor work, no host
synchronisation. On a measured step each layer's per-sequence use counts are computed on the
activation's device and moved to the host in one transfer after the forward pass.
``torch.compile`` drops hooks inside compiled regions: a compiled model is refused (measure the
uncompiled module, or use sparsetrace's trainer, which measures inside the graph).

**Resume.** :meth:`state_dict` / :meth:`load_state_dict` go with your checkpoint; loading
truncates the run directory's logs to the checkpoint's step (rows from that step on are
re-measured), so a resumed run's logs equal an uninterrupted one's.
"""

from __future__ import annotations

import inspect
import json
import math
import platform
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

import sparsetrace
from sparsetrace.analysis.tracer import forward_inputs
from sparsetrace.errors import UserError
from sparsetrace.metrics import DEFAULT_PERCENTILES, UseStats, use_counts, use_stats_from_counts
from sparsetrace.rundir import RunWriter, atomic_write_text
from sparsetrace.sites import Gated, Hooks, LayerSelection, Site, locate, select
from sparsetrace.tracking import LifecycleTracker

STATE_VERSION = 1


def _distributed() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def merge_meta(base: Mapping[str, Any], extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """``base`` updated with ``extra``, one level deep (``extra["train"]`` adds to
    ``base["train"]`` rather than replacing it)."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for key, value in (extra or {}).items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key].update(value)
        else:
            out[key] = value
    return out


class Recorder:
    """Hidden-unit use of ``model``'s MLPs over training, written as a sparsetrace run directory.

    Args:
        model: the model whose forward passes are measured (not a ``torch.compile`` wrapper).
        run_dir: the run directory to write (created; one holding another run is refused unless
            ``resume``).
        every: measure step 0 and every ``every``-th step.
        layers: which layers (None: all; a regex on ``blocks.{i}.mlp.hidden``, a predicate, or a
            list of names / indices).
        gated: gated MLPs: measure ``act(gate) * up`` ("product") or ``act(gate)`` ("gate").
        modules: dotted paths of the modules whose forward input is the hidden activation, for
            architectures sparsetrace does not know.
        percentiles: the rescaled percentiles to record (paper: 50, 65, 75, 90).
        tokens_per_step: tokens of one optimizer step over all ranks and micro-batches, for the
            ``tokens`` column (None: the measured micro-batch's tokens times the world size,
            right without gradient accumulation).
        meta: what to record in meta.json about the run (e.g. ``{"train": {"warmup_steps": 500,
            "steps": 10000}}``; the report's "when do units die" needs the warm-up).
        tensorboard: also write TensorBoard scalars into ``run_dir/tb``.
        resume: continue the run in ``run_dir`` (then call :meth:`load_state_dict`).
    """

    def __init__(
        self,
        model: nn.Module,
        run_dir: str | Path,
        *,
        every: int = 20,
        layers: LayerSelection = None,
        gated: Gated = "product",
        modules: Sequence[str] | None = None,
        percentiles: Sequence[float] = DEFAULT_PERCENTILES,
        tokens_per_step: int | None = None,
        meta: Mapping[str, Any] | None = None,
        tensorboard: bool = True,
        resume: bool = False,
    ) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise UserError(f"every must be a positive number of steps, got {every!r}")
        if hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", None) is not None:
            raise UserError(
                "this model is compiled (torch.compile): hooks inside compiled regions are "
                "dropped, so measurements would be silently wrong; give the Recorder the "
                "uncompiled module (model._orig_mod) and call it, or train with sparsetrace"
            )
        # No reference to the model is kept past __init__ (the hooks hold the Recorder, not the
        # reverse): under DDP the wrapper's C++ Reducer owns the process group, and if it is the
        # last owner when it is freed, PyTorch joins gloo's worker threads while holding the GIL
        # -- a deadlock (pytorch#56297) that a Recorder keeping the wrapper alive would invite.
        self.every, self.tokens_per_step = every, tokens_per_step
        self.percentiles = [float(p) for p in percentiles]
        self.architecture, sites = locate(model, gated, modules)
        self.sites: list[Site] = select(sites, layers)
        self.run_dir = Path(run_dir)
        self.rank, self.world_size = _distributed()
        self.tracker = LifecycleTracker()
        self.last_step: int | None = None
        self._signature = inspect.signature(model.forward)
        self._armed: int | None = None  # the step being measured, until its forward pass ran
        self._measured_step: int | None = None  # the step begun, if it is measured
        self._counts: dict[int, Tensor] = {}  # site index -> (batch, hidden) use counts
        self._lengths: Tensor | None = None  # (batch,) real tokens per sequence
        self._capture_mask: Tensor | None = None
        self._batch_shape: tuple[int, ...] | None = None
        self._closed = False
        self._meta: dict[str, Any] = {}
        self._model_class = type(model).__name__
        self.writer: RunWriter | None = None
        if self.is_main:
            self._open(resume, dict(meta or {}), tensorboard)
        self._hooks = Hooks()
        self._hooks.before(model, self._start, with_kwargs=True)
        self._hooks.on_sites(self.sites, self._on_input, self._on_output)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -----------------------------------------------------------------------------------------
    # the run directory

    def _open(self, resume: bool, meta: dict[str, Any], tensorboard: bool) -> None:
        holds_run = (self.run_dir / "sparsity.csv").exists() or (
            self.run_dir / "meta.json"
        ).exists()
        if holds_run and not resume:
            raise UserError(
                f"{self.run_dir} already holds a run; pass resume=True to continue it (then "
                "load_state_dict from your checkpoint) or choose another directory"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.writer = RunWriter(self.run_dir, self.percentiles, tensorboard=tensorboard)
        self._meta = {
            "run_name": self.run_dir.name, "status": "running", "step": 0,
            "source": "sparsetrace.Recorder", "architecture": self.architecture,
            "model": {"n_layers": len(self.sites), "d_ff": None,
                      "class": self._model_class},
            "layers": [{"layer": s.layer, "name": s.name, "module": s.path, "measured": s.measured}
                       for s in self.sites],
            "trace": {"every": self.every, "percentiles": self.percentiles,
                      "measured": "the first forward pass of each measured step (micro-batch 0)"},
            "train": {}, "world_size": self.world_size,
            "versions": {"sparsetrace": sparsetrace.__version__, "torch": torch.__version__,
                         "python": platform.python_version()},
        }  # fmt: skip
        self._meta = merge_meta(self._meta, meta)
        self._write_meta()

    def _write_meta(self, **changes: Any) -> None:
        self._meta.update(changes, updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        atomic_write_text(self.run_dir / "meta.json", json.dumps(self._meta, indent=2))

    # -----------------------------------------------------------------------------------------
    # measuring

    def measures(self, step: int) -> bool:
        """Whether ``step`` is measured: step 0 and every ``every``-th."""
        return step % self.every == 0

    @contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Measure the first forward pass inside the block if ``step`` is due, then record it."""
        self.begin(step)
        try:
            yield
        except BaseException:
            self._abandon()  # the forward failed (OOM, a bug): let its own error through
            raise
        self.end()

    def begin(self, step: int) -> None:
        """Arm the hooks for the next forward pass if ``step`` is due (callbacks' entry point)."""
        if self._closed:
            raise UserError("the Recorder is closed")
        if not isinstance(step, int) or step < 0:
            raise UserError(f"step must be a non-negative integer, got {step!r}")
        self._counts.clear()
        self._lengths = None
        self._armed = step if self.measures(step) else None
        self._measured_step = self._armed

    def _abandon(self) -> None:
        self._armed = self._measured_step = None
        self._counts.clear()
        self._lengths = None

    def end(self) -> int | None:
        """Record the measured forward pass of the current step (nothing if none was due);
        returns the step recorded, or None."""
        step, self._armed = self._measured_step, None
        self._measured_step = None
        if step is None:
            return None
        if len(self._counts) != len(self.sites):
            raise UserError(
                f"step {step}: {len(self._counts)} of {len(self.sites)} measured layers ran; "
                "call the model's forward inside Recorder.step()"
            )
        self._record(step)
        return step

    def _start(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self._armed is None or self._counts:
            return  # unmeasured step, or a later micro-batch of a measured one: nothing to do
        self._batch_shape, mask = forward_inputs(self._signature, args, kwargs)
        self._capture_mask = mask if mask is not None and mask.dim() == 2 else None

    def _on_input(self, index: int, module: nn.Module, args: tuple) -> None:
        if self._armed is not None:
            self._count(index, args[0])

    def _on_output(self, index: int, module: nn.Module, args: tuple, output: Tensor) -> None:
        if self._armed is not None:
            self._count(index, output)

    def _count(self, index: int, h: Tensor) -> None:
        if index in self._counts:  # recomputed (gradient checkpointing) or a later micro-batch
            if len(self._counts) == len(self.sites):
                self._armed = None  # the measured forward is complete: disarm
            return
        site = self.sites[index]
        with torch.no_grad():
            h = h.detach()
            if site.transform is not None:
                h = site.transform(h)
            if h.dim() == 2 and self._batch_shape and math.prod(self._batch_shape) == h.shape[0]:
                h = h.reshape(*self._batch_shape, h.shape[-1])
            if h.dim() != 3:
                raise UserError(f"{site.path}: activation {tuple(h.shape)} is not (batch, seq, "
                                "hidden)")  # fmt: skip
            mask = self._capture_mask
            if mask is not None:
                mask = mask[:, -h.shape[1] :].to(h.device, torch.bool)
            self._counts[index] = use_counts(h, mask)
            if self._lengths is None or index == 0:  # stays on the device until _record
                self._lengths = (
                    torch.full((h.shape[0],), h.shape[1]) if mask is None else mask.sum(-1)
                )
        if len(self._counts) == len(self.sites):
            self._armed = None  # later micro-batches of this step are not measured

    def _record(self, step: int) -> None:
        # The one host transfer of a measured step: every layer's counts at once.
        names = [s.name for s in self.sites]
        widths = [self._counts[i].shape[-1] for i in range(len(self.sites))]
        first = self._counts[0]
        lengths = self._lengths if self._lengths is not None else torch.zeros(0)
        parts = [self._counts[i].reshape(-1).to(first.device) for i in range(len(self.sites))]
        parts.append(lengths.to(first.device, first.dtype))
        flat = torch.cat(parts).cpu()
        batch = int(lengths.numel())
        lengths = flat[-batch:].long() if batch else lengths
        stats: dict[str, UseStats] = {}
        offset = 0
        for name, width in zip(names, widths, strict=True):
            counts = flat[offset : offset + batch * width].reshape(batch, width)
            offset += batch * width
            stats[name] = use_stats_from_counts(counts, lengths, self.percentiles)
        per_step = self.tokens_per_step or int(lengths.sum()) * self.world_size
        tokens = step * per_step
        from sparsetrace.train import parallelize

        scopes = parallelize.scoped_stats(stats, parallelize.Dist(self.rank, self.world_size))
        self.tracker.update(step, {n: s.batch_used for n, s in stats.items()})
        self.last_step = step
        self._counts.clear()
        if self.writer is None:
            return
        for scope, values in scopes.items():
            self.writer.log_sparsity(step, tokens, values, scope=scope)
        self.writer.write_lifecycle(self.tracker)
        if self._meta["model"]["d_ff"] is None:
            self._meta["model"]["d_ff"] = widths
        self._write_meta(step=step)

    # -----------------------------------------------------------------------------------------
    # what the user logs through it

    def log(self, step: int, **scalars: float) -> None:
        """A row of train.csv (e.g. ``loss=``, ``lr=``) at ``step`` (rank 0 writes)."""
        if self.writer is not None:
            self.writer.log_train({"step": step, **{k: float(v) for k, v in scalars.items()}})

    def log_eval(self, step: int, **scalars: float) -> None:
        """A row of eval.csv (e.g. ``val_loss=``, ``val_acc=``) at ``step``."""
        if self.writer is not None:
            self.writer.log_eval({"step": step, **{k: float(v) for k, v in scalars.items()}})

    def latest(self) -> dict[str, float]:
        """The last measured step's per-layer use (fractions), for a trainer's own logging."""
        out: dict[str, float] = {}
        for name, layer in self.tracker.layers.items():
            transitions = layer.transitions
            if transitions:
                out[f"sparsity/{name}/per_batch_frac"] = transitions[-1][1] / layer.hidden
        return out

    # -----------------------------------------------------------------------------------------
    # checkpoints

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to continue the run: the lifecycle and the last step."""
        return {"version": STATE_VERSION, "last_step": self.last_step,
                "tracker": self.tracker.state_dict(), "every": self.every,
                "layers": [s.name for s in self.sites]}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any], step: int) -> None:
        """Continue from a checkpoint taken after ``step`` optimizer updates: the lifecycle as
        it was, and the run directory's rows from ``step`` on dropped (they are measured again).
        """
        if state.get("version") != STATE_VERSION:
            raise UserError(f"recorder state of version {state.get('version')!r}; expected "
                            f"{STATE_VERSION}")  # fmt: skip
        if list(state.get("layers", [])) != [s.name for s in self.sites]:
            raise UserError(
                "the checkpoint's recorder measured other layers "
                f"({state.get('layers')}) than this model has ({[s.name for s in self.sites]}): "
                "the architecture changed"
            )
        self.tracker.load_state_dict(state["tracker"])
        self.last_step = state.get("last_step")
        if self.writer is not None:
            self.writer.close()
            self.writer = RunWriter(self.run_dir, self.percentiles, resume_step=step,
                                    tensorboard=self.writer.tb is not None)  # fmt: skip
            self.writer.write_lifecycle(self.tracker)
            self._write_meta(step=step, status="running")

    def close(self, finished: bool = True) -> None:
        """Remove the hooks and close the logs (meta.json says finished or interrupted)."""
        if self._closed:
            return
        self._closed = True
        self._hooks.remove()
        if self.writer is not None:
            self.writer.close()
            self._write_meta(status="finished" if finished else "interrupted")

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(finished=exc_type is None)
