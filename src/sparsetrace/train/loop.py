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
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from sparsetrace.config import RunConfig, to_dict
from sparsetrace.data import PreparedData, batch_indices, epochs_for, get_batch, prepare_data
from sparsetrace.errors import UserError
from sparsetrace.metrics import use_stats_from_counts
from sparsetrace.model.transformer import ModelConfig, Transformer
from sparsetrace.rundir import RunWriter, atomic_write_text
from sparsetrace.tracking import LifecycleTracker
from sparsetrace.train import runmeta
from sparsetrace.train.checkpoint import (
    list_checkpoints,
    load_state,
    load_weights,
    save_checkpoint,
)


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(
            f"train.device: unknown device {name!r} (auto, cpu, cuda, cuda:N)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is cuda but no CUDA GPU is available")
    return device


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: fp32). auto = bf16 on CUDA and on CPUs with native bf16 units."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    return torch.bfloat16 if native else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


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
    start_step: int = 0
    elapsed_s: float = 0.0

    @property
    def tokens_per_step(self) -> int:
        t = self.cfg.train
        return t.batch_size * t.grad_accum * self.cfg.data.seq_len


def setup(cfg: RunConfig, resume: bool = False) -> Session:
    """Prepare data, model, optimizer; with ``resume`` continue from the latest checkpoint."""
    run_dir = Path(cfg.out_dir) / cfg.run_name
    existing = list_checkpoints(run_dir)
    if not resume and (existing or (run_dir / "train.csv").exists()):
        raise UserError(
            f"run directory {run_dir} already holds a run; pass --resume to continue it "
            "or --run_name NAME for a new one"
        )
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    data = prepare_data(cfg.data)
    if cfg.model.vocab_size not in (0, data.vocab_size):
        raise UserError(f"model.vocab_size {cfg.model.vocab_size} != tokenizer's {data.vocab_size}")
    cfg.model = cfg.model.with_data(data.vocab_size, cfg.data.seq_len)
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model).to(device)
    optimizer = _optimizer(model, cfg)
    session = Session(
        cfg=cfg, run_dir=run_dir, data=data, model=model,
        step_model=torch.compile(model) if cfg.train.compile else model,
        optimizer=optimizer, tracker=LifecycleTracker(), device=device,
        amp_dtype=resolve_precision(cfg.train.precision, device),
    )  # fmt: skip
    if resume:
        if not existing:
            raise UserError(f"--resume: {run_dir} has no checkpoint to resume from")
        _restore(session, existing[-1])
    return session


def _optimizer(model: Transformer, cfg: RunConfig) -> torch.optim.Optimizer:
    # Weight decay on matrices (embeddings included, as in GPT-2/nanoGPT), not on biases/gains.
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    t = cfg.train
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr, betas=(t.beta1, t.beta2),
    )  # fmt: skip


def _restore(session: Session, path: Path) -> None:
    state = load_state(path)
    current = model_identity(session.cfg.model)
    saved = state.get("model_config", {})
    if saved != current:
        diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        raise UserError(
            f"checkpoint {path} is from another model config (differs in: {', '.join(diff)})"
        )
    load_weights(path, session.model)
    for mlp in session.model.mlps().values():  # the masks came back as buffers; refresh flags
        mlp.set_unit_mask(mlp.unit_mask.clone())
    session.optimizer.load_state_dict(state["optimizer"])
    session.tracker.load_state_dict(state["tracker"])
    torch.set_rng_state(state["rng_cpu"])
    if torch.cuda.is_available() and state.get("rng_cuda") is not None:
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    session.start_step = int(state["step"])
    session.elapsed_s = float(state.get("elapsed_s", 0.0))


def model_identity(m: ModelConfig) -> dict[str, Any]:
    """The resolved architecture, as compared when resuming (per-layer widths included)."""
    d = asdict(m)
    d.pop("d_ff_per_layer")
    return d


def _checkpoint(session: Session, step: int) -> None:
    state = {
        "step": step,
        "optimizer": session.optimizer.state_dict(),
        "tracker": session.tracker.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "model_config": model_identity(session.cfg.model),
        "config": to_dict(session.cfg),
        "elapsed_s": session.elapsed_s,
    }
    save_checkpoint(session.run_dir, step, session.model, state, session.cfg.checkpoint.keep)


def _batch(
    session: Session, split: str, step: int, micro: int
) -> tuple[torch.Tensor, torch.Tensor]:
    t = session.cfg.train
    tokens = session.data.train if split == "train" else session.data.val
    n = session.data.n_sequences(split)
    idx = batch_indices(n, step * t.grad_accum + micro, t.batch_size, t.seed)
    batch = get_batch(tokens, idx, session.cfg.data.seq_len).to(session.device, non_blocking=True)
    return batch[:, :-1], batch[:, 1:]


@torch.no_grad()
def evaluate(session: Session) -> dict[str, float]:
    """Validation loss, perplexity and next-token accuracy on a fixed set of held-out sequences."""
    model, cfg = session.model, session.cfg
    model.eval()
    n = session.data.n_sequences("val")
    total_loss, correct, count = 0.0, 0, 0
    for i in range(cfg.eval.batches):
        start = i * cfg.train.batch_size
        if start >= n:
            break
        idx = torch.arange(start, min(start + cfg.train.batch_size, n)).numpy()
        batch = get_batch(session.data.val, idx, cfg.data.seq_len).to(session.device)
        x, y = batch[:, :-1], batch[:, 1:]
        with autocast(session.device, session.amp_dtype):
            out = model(x, y)
        total_loss += float(out.loss) * y.numel()
        correct += int((out.logits.argmax(-1) == y).sum())
        count += y.numel()
    model.train()
    val_loss = total_loss / max(count, 1)
    return {
        "val_loss": val_loss,
        "val_ppl": math.exp(min(val_loss, 50.0)),
        "val_acc": correct / max(count, 1),
    }


def train(cfg: RunConfig, resume: bool = False, command: str = "") -> Path:
    """Train ``cfg`` (or resume it) and write the run directory; returns its path."""
    session = setup(cfg, resume)
    cfg, model = session.cfg, session.model
    t = cfg.train
    writer = RunWriter(session.run_dir, cfg.trace.percentiles,
                       resume_step=session.start_step if resume else None)  # fmt: skip
    meta = runmeta.initial_meta(
        session,
        command,
        epochs_for(session.data.n_sequences("train"), t.steps, t.batch_size * t.grad_accum),
    )
    runmeta.write_config_and_meta(session.run_dir, cfg, meta)
    progress = runmeta.Progress(t.steps, session.start_step, session.tokens_per_step)
    model.train()
    step = session.start_step
    try:
        for step in range(session.start_step, t.steps):
            t0 = time.perf_counter()
            mask_now = cfg.mask.at_step > 0 and step == cfg.mask.at_step
            measure = mask_now or (
                cfg.trace.every > 0 and (step % cfg.trace.every == 0 or step == t.steps - 1)
            )
            counts, loss_sum = None, torch.zeros((), device=session.device)
            for group in session.optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            for micro in range(t.grad_accum):
                x, y = _batch(session, "train", step, micro)
                with autocast(session.device, session.amp_dtype):
                    out = session.step_model(x, y, measure=measure and micro == 0)
                (out.loss / t.grad_accum).backward()
                loss_sum += out.loss.detach()
                counts = out.use_counts if micro == 0 else counts
            loss = float(loss_sum) / t.grad_accum  # one host sync per step (NaN check)
            if not math.isfinite(loss):
                _diverged(session, meta, step, loss)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip))
            session.optimizer.step()
            session.optimizer.zero_grad(set_to_none=True)
            tokens = step * session.tokens_per_step
            if counts is not None:
                stats = {name: use_stats_from_counts(c, cfg.data.seq_len, cfg.trace.percentiles)
                         for name, c in counts.items()}  # fmt: skip
                writer.log_sparsity(step, tokens, stats)
                session.tracker.update(step, {n: s.batch_used for n, s in stats.items()})
                writer.write_lifecycle(session.tracker)
                if mask_now:
                    _apply_unit_masks(session, step, {n: s.batch_used for n, s in stats.items()})
            dt = time.perf_counter() - t0
            session.elapsed_s += dt
            writer.log_train({"step": step, "tokens": tokens, "lr": lr_at(step, cfg), "loss": loss,
                              "grad_norm": grad_norm, "step_time_s": dt})  # fmt: skip
            done = step + 1
            if done % cfg.eval.every == 0 or done == t.steps:
                writer.log_eval({"step": done, "tokens": done * session.tokens_per_step,
                                 **evaluate(session)})  # fmt: skip
            if done % cfg.checkpoint.every == 0 or done == t.steps:
                _checkpoint(session, done)
                runmeta.update_meta(session.run_dir, meta, step=done, elapsed_s=session.elapsed_s)
            progress.update(done, loss)
    except KeyboardInterrupt:
        runmeta.update_meta(session.run_dir, meta, status="interrupted", step=step)
        raise
    finally:
        progress.close()
        writer.close()
    runmeta.update_meta(session.run_dir, meta, status="finished", step=t.steps,
                        elapsed_s=session.elapsed_s)  # fmt: skip
    return session.run_dir


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
        layers[name] = {"hidden": keep.numel(), "masked": int((~keep).sum())}
    total = sum(v["hidden"] for v in layers.values())
    masked = sum(v["masked"] for v in layers.values())
    info = {"step": step, "kind": session.cfg.mask.kind, "layers": layers,
            "masked_fraction": masked / total}  # fmt: skip
    atomic_write_text(session.run_dir / "mask.json", json.dumps(info, indent=2))


def _diverged(session: Session, meta: dict[str, Any], step: int, loss: float) -> None:
    ckpts = list_checkpoints(session.run_dir)
    kept = f"the last good checkpoint is {ckpts[-1]}" if ckpts else "no checkpoint was written yet"
    runmeta.update_meta(session.run_dir, meta, status="failed", step=step,
                        error=f"loss {loss} at step {step}")  # fmt: skip
    raise TrainingDiverged(
        f"loss became {loss} at step {step} (try a lower train.lr or train.grad_clip); {kept}"
    )
