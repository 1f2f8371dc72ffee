"""Everything distributed, in one place: process group, model wrapping, collectives for metrics.

``torchrun --nproc_per_node=N -m sparsetrace train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK;
this module turns them into a :class:`Dist`, wraps the model with PyTorch's own engines (DDP, or
FSDP2's ``fully_shard`` for models too wide for one device) and provides the few collectives the
trainer needs. Nothing here is home-made communication: all of it is ``torch.distributed``.

Sparsity across devices (paper 2.1 computes per device; we add the global view):
- ``device`` scope: rank 0's device batch, exactly the paper's per-device metric;
- ``global`` scope: the union over all devices' batches. Per-batch use = OR of the per-device
  used masks (all-reduce MAX of 0/1); per-token use, per-sequence use and percentiles are means
  over all tokens / sequences (all-reduce SUM of the per-device sums);
- ``device_min`` / ``device_max``: the spread of each per-device metric across ranks.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from sparsetrace.metrics import UseStats


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes (if any); the device of this rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    info = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return info, device


def shutdown(info: Dist) -> None:
    """Leave the process group. Free any DDP wrapper first: if its C++ Reducer is the group's last
    owner, freeing it later joins gloo's worker threads with the GIL held while a worker finishing
    the last collective waits for the GIL -- a deadlock at exit (pytorch#56297; seen in CI)."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def gloo_workers() -> int:
    """Gloo worker threads alive in this process (thread names in ``/proc``; 0 without it)."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return 0
    names = []
    for task in tasks.iterdir():
        try:
            names.append((task / "comm").read_text())
        except OSError:  # the thread ended while we looked
            continue
    return sum(name.startswith("pt_gloo_runloop") for name in names)


def leave(code: int) -> int:
    """The exit code; or, where gloo workers outlived the process group, leave the process at once
    with it (no return) without finalizing the interpreter. Linux only (``/proc``); elsewhere the
    code is returned.

    PyTorch's functional collectives (DTensor, so FSDP2) keep the gloo group alive after
    ``destroy_process_group``, so its worker threads live on. A worker still releasing a finished
    collective's tensors needs the GIL; asked for during interpreter finalization, the GIL ends the
    thread with ``pthread_exit``, whose unwinding through a ``noexcept`` destructor calls
    ``std::terminate``: "terminate called without an active exception", SIGABRT at exit (rare;
    ``scripts/gloo_exit_abort.py`` shows it; pytorch#190489). Without finalization nothing asks.
    Everything sparsetrace writes is closed before this point; standard streams are flushed here.
    """
    if gloo_workers() == 0:
        return code
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError, OSError):  # None, closed, broken pipe
            stream.flush()
    os._exit(code)


def barrier(info: Dist) -> None:
    if info.enabled:
        dist.barrier()


def wrap_model(
    model: nn.Module, info: Dist, device: torch.device, strategy: Literal["ddp", "fsdp"]
) -> nn.Module:
    """DDP (replicated) or FSDP2 (each block sharded, then the root) across the process group."""
    if not info.enabled:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def all_reduce_mean(value: torch.Tensor, info: Dist) -> torch.Tensor:
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= info.world_size
    return value


def all_reduce_sum(value: torch.Tensor, info: Dist) -> torch.Tensor:
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def collective_device() -> torch.device:
    """Where this rank's collectives run: its current GPU under NCCL, else the CPU (gloo)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def scoped_stats(stats: dict[str, UseStats], info: Dist) -> dict[str, dict[str, UseStats]]:
    """The rows to log for one measured batch: scope ``device`` (this rank's batch) and, when
    distributed, ``global``, ``device_min`` and ``device_max`` (see module doc)."""
    scopes = {"device": stats}
    if info.enabled:
        scopes["global"], scopes["device_min"], scopes["device_max"] = global_stats(stats, info)
    return scopes


def global_stats(
    local: dict[str, UseStats], info: Dist
) -> tuple[dict[str, UseStats], dict[str, UseStats], dict[str, UseStats]]:
    """(global, per-device min, per-device max) statistics of each layer; see module doc.

    Every rank holds the same number of sequences and tokens (equal device batches), so means over
    the global batch are means of the per-device means.
    """
    glob, lo, hi = {}, {}, {}
    where = collective_device()
    for name, s in local.items():
        home = s.batch_used.device  # results come back where the caller's statistics live
        used = s.batch_used.to(where, torch.uint8)
        dist.all_reduce(used, op=dist.ReduceOp.MAX)  # logical OR of the per-device used masks
        scalars = torch.stack(
            [s.per_token, s.per_sequence, s.per_batch, *s.percentiles.values()]
        ).to(where, torch.float64)
        gathered = [torch.empty_like(scalars) for _ in range(info.world_size)]
        dist.all_gather(gathered, scalars)
        every = torch.stack(gathered).to(home)  # (world, metrics)
        mean, mins, maxs = every.mean(0), every.min(0).values, every.max(0).values
        union = used.to(home).bool()
        glob[name] = _stats_from(s, mean, union, per_batch=union.sum().double())
        lo[name] = _stats_from(s, mins, s.batch_used)
        hi[name] = _stats_from(s, maxs, s.batch_used)
    return glob, lo, hi


def _stats_from(
    template: UseStats,
    values: torch.Tensor,
    used: torch.Tensor,
    per_batch: torch.Tensor | None = None,
) -> UseStats:
    pcts = dict(zip(template.percentiles, values[3:], strict=True))
    return replace(
        template,
        per_token=values[0],
        per_sequence=values[1],
        per_batch=values[2] if per_batch is None else per_batch,
        percentiles=pcts,
        batch_used=used,
    )


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights on CPU (collective under FSDP), tied duplicates left out."""
    state = get_model_state_dict(model, options=_FULL)
    unique = {name for name, _ in model.named_parameters()}
    for name, _ in model.named_parameters(remove_duplicate=False):
        if name not in unique:  # a tied alias (e.g. the output head of tied embeddings)
            state.pop(name, None)
    return state


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter names, unsharded: loadable at any world size."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, info: Dist
) -> None:
    options = StateDictOptions(full_state_dict=True) if info.enabled else StateDictOptions()
    set_optimizer_state_dict(model, optimizer, state, options=options)
