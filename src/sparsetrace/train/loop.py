"""The training loop: AdamW, warm-up + cosine, and sparsity traced inside the forward pass.

Paper: Wild & Anderson, section 2.2 (AdamW, linear warm-up then cosine decay, metrics per device
batch). Every ``trace.every`` steps (and at step 0 and the last step) the first micro-batch's
forward pass returns each MLP's per-sequence use counts; the metrics and the lifecycle tracker
are updated from them. Batches are a pure function of (seed, step), so a resumed run replays the
uninterrupted one exactly.
"""

from __future__ import annotations

import json
import math
import sys
import time
import traceback
from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparsetrace.checkpoint import (
    CheckpointWriter,
    list_checkpoints,
    load_state,
    load_weights,
)
from sparsetrace.config import RunConfig, to_dict
from sparsetrace.data import PreparedData, batch_indices, epochs_for, get_batch, prepare_data
from sparsetrace.device import (
    autocast,
    configure_backends,
    resolve_device,
    resolve_precision,
    use_arithmetic,
)
from sparsetrace.errors import UserError
from sparsetrace.metrics import use_stats_from_counts
from sparsetrace.model.transformer import ModelConfig, Transformer
from sparsetrace.rundir import RunWriter, atomic_write_text
from sparsetrace.tracking import LifecycleTracker
from sparsetrace.train import parallelize, runmeta


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def lr_at(step: int, cfg: RunConfig) -> float:
    """Linear warm-up to the peak, then cosine decay to ``peak * min_lr_ratio`` (paper, 2.2)."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return t.lr * (t.min_lr_ratio + (1.0 - t.min_lr_ratio) * cosine)


@dataclass
class Session:
    """What one training process holds; built by :func:`setup`, stepped by :func:`train`."""

    cfg: RunConfig
    run_dir: Path
    data: PreparedData
    model: Transformer
    step_model: torch.nn.Module  # the compiled model where train.compile is on
    optimizer: torch.optim.Optimizer
    tracker: LifecycleTracker
    device: torch.device
    amp_dtype: torch.dtype | None
    dist: parallelize.Dist
    checkpoints: CheckpointWriter
    start_step: int = 0
    elapsed_s: float = 0.0

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step over all ranks and micro-batches."""
        t = self.cfg.train
        return t.batch_size * t.grad_accum * self.dist.world_size * self.cfg.data.seq_len


def setup(cfg: RunConfig, resume: bool = False, data: PreparedData | None = None) -> Session:
    """Prepare data (unless given: ``data``, e.g. a benchmark's synthetic tokens), model and
    optimizer; with ``resume`` continue from the latest checkpoint."""
    run_dir = Path(cfg.out_dir) / cfg.run_name
    existing = list_checkpoints(run_dir)
    if not resume and (existing or (run_dir / "train.csv").exists()):
        raise UserError(
            f"run directory {run_dir} already holds a run; pass --resume to continue it "
            "or --run_name NAME for a new one"
        )
    if resume and not existing:
        raise UserError(f"--resume: {run_dir} has no checkpoint to resume from")
    device = resolve_device(cfg.train.device)
    use_arithmetic(cfg.train.arithmetic, cfg.train.threads, device)  # before any tensor operation
    info, device = parallelize.init_distributed(device)
    configure_backends(device, cfg.train.tf32)
    if info.enabled and cfg.train.parallel == "fsdp" and cfg.trace.sparsing_every:
        raise UserError("trace.sparsing_every runs on rank 0 alone: not with train.parallel fsdp")
    # Every rank has checked the run directory before rank 0 writes into it; rank 0 builds the
    # token cache before the others read it.
    parallelize.barrier(info)
    if not info.is_main:
        parallelize.barrier(info)
    data = prepare_data(cfg.data) if data is None else data
    if info.is_main:
        parallelize.barrier(info)
    if cfg.model.vocab_size not in (0, data.vocab_size):
        raise UserError(f"model.vocab_size {cfg.model.vocab_size} != tokenizer's {data.vocab_size}")
    cfg.model = cfg.model.with_data(data.vocab_size, cfg.data.seq_len)
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model)
    state = _restore_model(model, cfg, existing[-1]) if resume else None
    model.to(device)
    wrapped = parallelize.wrap_model(model, info, device, cfg.train.parallel)
    session = Session(
        cfg=cfg, run_dir=run_dir, data=data, model=model,
        step_model=torch.compile(wrapped) if cfg.train.compile else wrapped,
        optimizer=build_optimizer(model, cfg, fused=device.type == "cuda"),
        tracker=LifecycleTracker(), device=device,
        amp_dtype=resolve_precision(cfg.train.precision, device), dist=info,
        checkpoints=CheckpointWriter(background=cfg.checkpoint.background
                                     and device.type == "cuda" and info.is_main),
    )  # fmt: skip
    if state is not None:
        _restore_state(session, state)
    return session


def build_optimizer(
    model: Transformer, cfg: RunConfig, fused: bool = False
) -> torch.optim.Optimizer:
    """AdamW. Weight decay on matrices (embeddings included, as in GPT-2/nanoGPT), not on biases
    or gains; with ``train.mlp_lr_mult`` != 1 the MLP matrices form a group of their own whose
    ``lr_mult`` the schedule applies (:func:`_train_step`). ``fused``: one CUDA kernel for the
    whole update (the same update rule; results may differ from the per-tensor loop in the last
    bits)."""
    t = cfg.train
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    split_mlp = t.mlp_lr_mult != 1.0
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, p in named:
        mult = t.mlp_lr_mult if split_mlp and ".mlp.w_" in name and p.dim() >= 2 else 1.0
        groups.setdefault((t.weight_decay if p.dim() >= 2 else 0.0, mult), []).append(p)
    return torch.optim.AdamW(
        [{"params": ps, "weight_decay": wd, "lr_mult": mult}
         for (wd, mult), ps in groups.items()],
        lr=t.lr, betas=(t.beta1, t.beta2), fused=fused or None,
    )  # fmt: skip


def _restore_model(model: Transformer, cfg: RunConfig, path: Path) -> dict[str, Any]:
    """Load a checkpoint's weights (before any sharding) and return its training state."""
    state = load_state(path)
    current = model_identity(cfg.model)
    # Fields added after a checkpoint was written were at their defaults then.
    defaults = model_identity(ModelConfig())
    saved = {**{k: v for k, v in defaults.items() if k in NEW_MODEL_FIELDS},
             **state.get("model_config", {})}  # fmt: skip
    if saved != current:
        diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        raise UserError(
            f"checkpoint {path} is from another model config (differs in: {', '.join(diff)})"
        )
    load_weights(path, model)
    for mlp in model.mlps().values():  # the masks came back as buffers; refresh their flags
        mlp.set_unit_mask(mlp.unit_mask.clone())
    return state


def _restore_state(session: Session, state: dict[str, Any]) -> None:
    fused = [group.get("fused") for group in session.optimizer.param_groups]
    parallelize.load_optimizer_state(
        session.model, session.optimizer, state["optimizer"], session.dist
    )
    for group, flag in zip(session.optimizer.param_groups, fused, strict=True):
        group["fused"] = flag  # this device's choice, not the one of the device that saved it
    session.tracker.load_state_dict(state["tracker"])
    torch.set_rng_state(state["rng_cpu"])
    if torch.cuda.is_available() and state.get("rng_cuda") is not None:
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    session.start_step = int(state["step"])
    session.elapsed_s = float(state.get("elapsed_s", 0.0))


# Model fields that checkpoints of older versions lack (their value then was the default).
NEW_MODEL_FIELDS = ("tied_logit_scale", "emb_init", "emb_init_std", "mlp_init")


def model_identity(m: ModelConfig) -> dict[str, Any]:
    """The resolved architecture, as compared when resuming (per-layer widths included)."""
    d = asdict(m)
    d.pop("d_ff_per_layer")
    return d


def _checkpoint(session: Session, step: int) -> None:
    """Full (unsharded) weights and optimizer state, written by rank 0: loadable at any world
    size. Gathering is collective, so every rank calls this."""
    weights = parallelize.full_model_state(session.model)
    optimizer = parallelize.full_optimizer_state(session.model, session.optimizer)
    if not session.dist.is_main:
        return
    state = {
        "step": step,
        "optimizer": optimizer,
        "tracker": session.tracker.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "model_config": model_identity(session.cfg.model),
        "config": to_dict(session.cfg),
        "elapsed_s": session.elapsed_s,
    }
    session.checkpoints.save(session.run_dir, step, weights, state, session.cfg.checkpoint.keep)


def train_batch(
    cfg: RunConfig, data: PreparedData, step: int, micro: int = 0, rank: int = 0, world: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of one rank's micro-batch of a step (CPU); micro 0 is the measured
    device batch. A pure function of the config and the step, hence exact resumes."""
    t = cfg.train
    idx = batch_indices(
        data.n_sequences("train"), step * t.grad_accum + micro, t.batch_size, t.seed, rank, world
    )
    batch = get_batch(data.train, idx, cfg.data.seq_len)
    return batch[:, :-1], batch[:, 1:]


@torch.no_grad()
def evaluate(session: Session) -> dict[str, float]:
    """Validation loss, perplexity and next-token accuracy on a fixed held-out set.

    The set is the first ``eval.batches`` global batches of the validation split (fewer if the
    split is smaller), each rank evaluating its device slice, so the set depends on the global
    batch only, not on how it is spread over ranks.
    """
    model, cfg, info = session.model, session.cfg, session.dist
    b = cfg.train.batch_size
    n_batches = min(cfg.eval.batches, session.data.n_sequences("val") // (b * info.world_size))
    totals = torch.zeros(3, dtype=torch.float64, device=session.device)  # loss sum, correct, n
    model.eval()
    for i in range(n_batches):
        start = (i * info.world_size + info.rank) * b
        batch = get_batch(session.data.val, np.arange(start, start + b), cfg.data.seq_len)
        x, y = batch[:, :-1].to(session.device), batch[:, 1:].to(session.device)
        with autocast(session.device, session.amp_dtype):
            out = model(x, y)
        totals += torch.stack([out.loss.double() * y.numel(),
                               (out.logits.argmax(-1) == y).sum().double(),
                               torch.tensor(float(y.numel()), device=session.device)])  # fmt: skip
    model.train()
    loss_sum, correct, count = parallelize.all_reduce_sum(totals, info).tolist()
    val_loss = loss_sum / max(count, 1.0)
    return {
        "val_loss": val_loss,
        "val_ppl": math.exp(min(val_loss, 50.0)),
        "val_acc": correct / max(count, 1.0),
    }


def train(
    cfg: RunConfig, resume: bool = False, command: str = "", data: PreparedData | None = None
) -> Path:
    """Train ``cfg`` (or resume it) and write the run directory (rank 0); returns its path."""
    session = setup(cfg, resume, data)
    cfg, t, main = session.cfg, session.cfg.train, session.dist.is_main
    writer = meta = None
    if main:
        writer = RunWriter(session.run_dir, cfg.trace.percentiles,
                           resume_step=session.start_step if resume else None)  # fmt: skip
        global_batch = t.batch_size * t.grad_accum * session.dist.world_size
        epochs = epochs_for(session.data.n_sequences("train"), t.steps, global_batch)
        meta = runmeta.initial_meta(session, command, epochs)
        runmeta.write_config_and_meta(session.run_dir, cfg, meta)
    progress = runmeta.Progress(t.steps, session.start_step, session.tokens_per_step, main)
    pending = PendingSteps(time.perf_counter())
    step = session.start_step
    try:
        for step in range(session.start_step, t.steps):
            mask_now = cfg.mask.at_step > 0 and step == cfg.mask.at_step
            measure = mask_now or (
                cfg.trace.every > 0 and (step % cfg.trace.every == 0 or step == t.steps - 1)
            )
            loss, grad_norm, counts = _train_step(session, step, measure)
            pending.add(step, loss, grad_norm, _to_host(counts, session.device), mask_now)
            done = step + 1
            kept = cfg.checkpoint.every
            checkpoint_now = kept > 0 and (done % kept == 0 or done == t.steps)
            # The tracker's state goes into the checkpoint and a mask acts from the next step:
            # both need this step's sparsity recorded first.
            eval_now = done % cfg.eval.every == 0 or done == t.steps
            sparsing_now = bool(cfg.trace.sparsing_every) and done % cfg.trace.sparsing_every == 0
            # Evaluations run on weights whose losses were checked (a NaN stops the run first).
            if done % t.log_every == 0 or checkpoint_now or mask_now or eval_now or sparsing_now:
                _flush(session, writer, meta, pending, progress)
            side_work = time.perf_counter()
            # The tracker's file at the checkpoints, the mask and the end (not at every read: a
            # GPU would wait while the host writes it).
            if writer is not None and (checkpoint_now or mask_now or done == t.steps):
                writer.write_lifecycle(session.tracker)
            if eval_now:
                scores = evaluate(session)  # every rank: sharded models need all of them
                if writer is not None:
                    writer.log_eval({"step": done, "tokens": done * session.tokens_per_step,
                                     **scores})  # fmt: skip
            if sparsing_now and writer is not None:
                writer.log_sparsing_law(_sparsing_law_rows(session, done))
            if checkpoint_now:
                _checkpoint(session, done)
                if meta is not None:
                    runmeta.update_meta(session.run_dir, meta, step=done,
                                        elapsed_s=session.elapsed_s)  # fmt: skip
            pending.exclude(time.perf_counter() - side_work)  # not part of the steps' time
        session.checkpoints.wait()
        # Ranks leave together: none tears down its process group while another still finishes
        # the last checkpoint (FSDP gathers, rank-0 writes). How a process ends after FSDP on
        # gloo: parallelize.leave.
        parallelize.barrier(session.dist)
    except KeyboardInterrupt:
        if meta is not None:
            runmeta.update_meta(session.run_dir, meta, status="interrupted", step=step)
        raise
    finally:
        session.checkpoints.close()
        progress.close()
        if writer is not None:
            writer.close()
        # The DDP wrapper goes first: its C++ Reducer must not be the process group's last owner
        # (see parallelize.shutdown). After a failed step, the frames of the traceback still hold
        # it: clear their locals (the traceback keeps its lines).
        session.step_model = session.model
        if session.dist.enabled and (failed := sys.exc_info()[1]) is not None:
            traceback.clear_frames(failed.__traceback__)
        parallelize.shutdown(session.dist)
    if meta is not None:
        runmeta.update_meta(session.run_dir, meta, status="finished", step=t.steps,
                            elapsed_s=session.elapsed_s)  # fmt: skip
    return session.run_dir


@dataclass
class PendingSteps:
    """Steps whose loss and gradient norm are still device tensors, with their use counts (on
    the host, copied without waiting): read together at the next flush, one wait for all."""

    since: float  # perf_counter at the previous flush
    excluded_s: float = 0.0  # evaluation and checkpoint time since then
    steps: list[tuple[int, torch.Tensor, torch.Tensor, dict | None, bool]] = field(
        default_factory=list
    )

    def add(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor,
            counts: dict[str, torch.Tensor] | None, mask_now: bool) -> None:  # fmt: skip
        self.steps.append((step, loss, grad_norm, counts, mask_now))

    def exclude(self, seconds: float) -> None:
        self.excluded_s += seconds


def _flush(
    session: Session,
    writer: RunWriter | None,
    meta: dict[str, Any] | None,
    pending: PendingSteps,
    progress: runmeta.Progress,
) -> None:
    """Read the pending steps' losses and norms (the one host wait); record each step's sparsity,
    then its train.csv row, in step order, up to a non-finite loss, which stops the run."""
    steps = pending.steps
    if not steps:
        return
    read = torch.stack([torch.stack([loss, norm]) for _, loss, norm, _, _ in steps]).tolist()
    good = next((i for i, (loss, _) in enumerate(read) if not math.isfinite(loss)), len(steps))
    for step, _, _, counts, mask_now in steps[:good]:
        if counts is not None:
            tokens = step * session.tokens_per_step
            _record_sparsity(session, writer, step, tokens, counts, mask_now)
    # The steps ran asynchronously: each gets an equal share of the wall time since the last
    # read, the host's work on their sparsity included.
    now = time.perf_counter()
    dt = max(now - pending.since - pending.excluded_s, 0.0) / len(steps)
    for (step, *_), (loss, grad_norm) in zip(steps[:good], read[:good], strict=True):
        session.elapsed_s += dt
        if writer is not None:
            writer.log_train({"step": step, "tokens": step * session.tokens_per_step,
                              "lr": lr_at(step, session.cfg), "loss": loss,
                              "grad_norm": grad_norm, "step_time_s": dt})  # fmt: skip
        progress.update(step + 1, loss)
    if good < len(steps):
        _diverged(session, meta, steps[good][0], read[good][0])
    steps.clear()
    pending.since, pending.excluded_s = now, 0.0


def _to_host(counts: dict[str, torch.Tensor] | None, device: torch.device) -> dict | None:
    """Use counts on the CPU. From a GPU: into pinned memory without waiting (the flush's read
    of the losses waits for these copies too, queued before it on the same stream)."""
    if counts is None or device.type != "cuda":
        return counts
    host = {}
    for name, c in counts.items():
        host[name] = torch.empty(c.shape, dtype=c.dtype, pin_memory=True)
        host[name].copy_(c, non_blocking=True)
    return host


def _train_step(
    session: Session, step: int, measure: bool
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None]:
    """One optimizer step over ``grad_accum`` micro-batches; the first one is measured.

    Returns the loss averaged over micro-batches and ranks and the gradient norm, as 0-d device
    tensors (reading them would make the host wait for the device), and the device batch's use
    counts (None when not measured).
    """
    t = session.cfg.train
    for group in session.optimizer.param_groups:
        group["lr"] = lr_at(step, session.cfg) * group.get("lr_mult", 1.0)
    counts, loss_sum = None, torch.zeros((), device=session.device)
    pin = session.device.type == "cuda"
    for micro in range(t.grad_accum):
        x, y = train_batch(
            session.cfg, session.data, step, micro, session.dist.rank, session.dist.world_size
        )
        if pin:  # page-locked: the copy below then runs without holding up the host
            x, y = x.pin_memory(), y.pin_memory()
        x, y = x.to(session.device, non_blocking=True), y.to(session.device, non_blocking=True)
        last = micro == t.grad_accum - 1
        # DDP: all-reduce the gradients once, after the last micro-batch.
        sync = nullcontext() if last or not session.dist.enabled else _no_sync(session.step_model)
        with sync:
            with autocast(session.device, session.amp_dtype):
                out = session.step_model(x, y, measure=measure and micro == 0)
            (out.loss / t.grad_accum).backward()
        loss_sum += out.loss.detach()
        counts = out.use_counts if micro == 0 else counts
    # float64, as the host's arithmetic: the logged loss is the fp32 sum divided in double.
    loss = parallelize.all_reduce_mean(loss_sum, session.dist).double() / t.grad_accum
    grad_norm = torch.nn.utils.clip_grad_norm_(session.model.parameters(), t.grad_clip)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a replicated DTensor
        grad_norm = grad_norm.full_tensor()
    session.optimizer.step()
    session.optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm.detach().double(), counts


def _no_sync(model: torch.nn.Module) -> AbstractContextManager:
    no_sync = getattr(model, "no_sync", None)
    return no_sync() if no_sync is not None else nullcontext()


def _record_sparsity(
    session: Session,
    writer: RunWriter | None,
    step: int,
    tokens: int,
    counts: dict[str, torch.Tensor],
    mask_now: bool,
) -> None:
    """Metrics of the device batch (paper: per device), plus the global view when distributed."""
    cfg = session.cfg
    stats = {name: use_stats_from_counts(c, cfg.data.seq_len, cfg.trace.percentiles)
             for name, c in counts.items()}  # fmt: skip
    scopes = parallelize.scoped_stats(stats, session.dist)
    session.tracker.update(step, {n: s.batch_used for n, s in stats.items()})
    if writer is not None:
        for scope, values in scopes.items():
            writer.log_sparsity(step, tokens, values, scope=scope)
    if mask_now:  # the union over devices, so that every replica applies the same mask
        used = scopes.get("global", stats)
        _apply_unit_masks(session, step, {n: s.batch_used for n, s in used.items()})


def _sparsing_law_rows(session: Session, done: int) -> list[dict[str, Any]]:
    """Sparsing Law PPL-p% activation ratio of the current model (rank 0, on validation tokens)."""
    from sparsetrace.sparsing.over_training import measurement_rows
    from sparsetrace.sparsing.search import Subject, ppl_sparsity
    from sparsetrace.sparsing.source import validation_batches

    tr, model = session.cfg.trace, session.model
    batches = validation_batches(session.data.val, session.cfg.data.seq_len, tr.sparsing_tokens)
    subject = Subject(model, batches)
    if tr.sparsing_cett > 0:
        measured = subject.measure(tr.sparsing_cett)
    else:
        measured = ppl_sparsity(subject, tr.sparsing_p).measurement
    model.train()
    return measurement_rows(done, done * session.tokens_per_step, measured)


def _apply_unit_masks(session: Session, step: int, batch_used: dict[str, torch.Tensor]) -> None:
    """Fix each layer's mask from this batch (paper 4.1.1): dead = unused units; random = as many
    units, chosen uniformly. Applied from the next step on; recorded in mask.json."""
    gen = torch.Generator().manual_seed(session.cfg.mask.seed)
    layers = {}
    for name, mlp in session.model.mlps().items():
        keep = batch_used[name].cpu()
        if session.cfg.mask.kind == "random":
            n_masked = int((~keep).sum())
            keep = torch.ones_like(keep)
            keep[torch.randperm(keep.numel(), generator=gen)[:n_masked]] = False
        mlp.set_unit_mask(keep.float())
        layers[name] = {"hidden": keep.numel(), "masked": int((~keep).sum()),
                        "units": (~keep).nonzero().flatten().tolist()}  # fmt: skip
    total = sum(v["hidden"] for v in layers.values())
    masked = sum(v["masked"] for v in layers.values())
    info = {"step": step, "kind": session.cfg.mask.kind, "layers": layers,
            "masked_fraction": masked / total}  # fmt: skip
    if session.dist.is_main:
        atomic_write_text(session.run_dir / "mask.json", json.dumps(info, indent=2))


def _diverged(session: Session, meta: dict[str, Any] | None, step: int, loss: float) -> None:
    # The list below must see a write still in flight; if that write failed, the checkpoints
    # listed are the ones that exist.
    with suppress(UserError):
        session.checkpoints.wait()
    ckpts = list_checkpoints(session.run_dir)
    kept = f"the last good checkpoint is {ckpts[-1]}" if ckpts else "no checkpoint was written yet"
    if meta is not None:
        runmeta.update_meta(session.run_dir, meta, status="failed", step=step,
                            error=f"loss {loss} at step {step}")  # fmt: skip
    raise TrainingDiverged(
        f"loss became {loss} at step {step} (try a lower train.lr or train.grad_clip); {kept}"
    )
