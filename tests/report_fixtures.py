"""Synthetic run directories with known hidden-unit use, for the report's tests.

Every layer's use is set by construction, so tests can state expected table cells by hand:
in every sequence of a batch, each token uses ``token`` units out of the sequence's ``sequence``
units, and the sequences' windows tile a batch window of ``batch`` units starting at unit
``offset``. Within a sequence the first ``hot`` units of its window fire on every token and
every token uses ``token - hot`` of the other units in turn (cyclically), so that units fire on
two different shares of the sequence and the rescaled percentiles differ from one another
(``hot`` is the largest count up to token / 4 that still lets the cycle cover the window).
Hence, exactly: per-token use = token, per-sequence use = sequence, per-batch use = batch; the
percentiles are checked against the naive A.6 transcription in tests/reference.py.

Each quantity ramps linearly from its first to its last value over ``ramp`` (fractions of
training). The batch window moves from [offset0, offset0 + batch0) to [offset1, offset1 + batch1)
continuously, so for the lifecycle: on at first batch = batch0, turned off = units of the first
window outside the last, turned on = the reverse, never used = units outside both windows'
span (when the windows overlap).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from sparsetrace.metrics import use_stats
from sparsetrace.rundir import RunWriter
from sparsetrace.tracking import LifecycleTracker

HIDDEN = 1024
N_SEQ = 8
SEQ_LEN = 32
STEPS = 1000
EVERY = 25
PEAK_LR = 3e-3


@dataclass(frozen=True)
class LayerSpec:
    """(first, last) values in units; ``ramp`` is when they change, as fractions of training."""

    token: tuple[int, int]
    sequence: tuple[int, int]
    batch: tuple[int, int]
    offset: tuple[int, int] = (0, 0)
    ramp: tuple[float, float] = (0.2, 0.5)


def paper_like() -> list[LayerSpec]:
    """Six layers that show every finding of the paper (warm-up: 10 % of training).

    Final per-batch use 128/800/720/760/840/944 units of 1024; layer 0 turns off 864 units;
    use at the first batch falls by 32 units a layer; turned on 0/10/48/80/112/144; never used
    32/54/48/48/48/48; per-token and percentile use fall first in the top layer (ramps start
    60 steps later a layer down, all after warm-up); layer 0's percentiles rise (the paper's
    reversal).
    """
    first_batch = [992, 960, 928, 896, 864, 832]
    last_end = [992, 970, 976, 976, 976, 976]  # last window's end: turned on = end - first_batch
    last_batch = [128, 800, 720, 760, 840, 944]
    token = [64, 48, 48, 40, 24, 16]
    sequence = [128, 512, 384, 640, 768, 512]
    return [
        LayerSpec(
            token=(256, token[i]),
            sequence=(768, sequence[i]),
            batch=(first_batch[i], last_batch[i]),
            offset=(0, last_end[i] - last_batch[i]),
            ramp=(0.12 + 0.06 * (5 - i), 0.4 + 0.06 * (5 - i)),
        )
        for i in range(6)
    ]


def contrary() -> list[LayerSpec]:
    """Six layers that show none of the paper's findings (use with warm-up = 20 % of training).

    Use at the first batch rises with depth, turned on falls, the last layer uses the fewest
    units per batch and turns off the most, per-token and per-batch use correlate positively,
    the last layer fires most often per sequence, use falls bottom-up during warm-up, and
    every unit is used at some point.
    """
    first_batch = [944, 960, 976, 992, 1008, 1024]  # turned on = 1024 - first_batch: 80 ... 0
    last_batch = [944, 840, 760, 720, 800, 128]
    token = [64, 48, 40, 32, 48, 16]
    sequence = [768, 640, 512, 512, 640, 128]
    return [
        LayerSpec(
            token=(256, token[i]),
            sequence=(768, sequence[i]),
            batch=(first_batch[i], last_batch[i]),
            offset=(0, HIDDEN - last_batch[i]),
            ramp=(0.02 + 0.02 * i, 0.06 + 0.02 * i),
        )
        for i in range(6)
    ]


def hot_units(k: int, s: int) -> int:
    """Units of a sequence's window that fire on every token: up to k / 4, as many as still let
    the other k - hot units per token cycle over all s - hot others within SEQ_LEN tokens."""
    if k >= s:
        return 0
    return max(0, min(k // 4, (SEQ_LEN * k - s) // (SEQ_LEN - 1)))


def _at(pair: tuple[int, int], ramp: tuple[float, float], frac: float) -> float:
    a, b = ramp
    w = min(max((frac - a) / (b - a), 0.0), 1.0)
    return pair[0] + w * (pair[1] - pair[0])


def activations(
    spec: LayerSpec, frac: float, gen: torch.Generator, hidden: int = HIDDEN
) -> torch.Tensor:
    """ReLU-like activations (N_SEQ, SEQ_LEN, hidden): the spec's use at ``frac`` of training."""
    k = round(_at(spec.token, spec.ramp, frac))
    s = round(_at(spec.sequence, spec.ramp, frac))
    start = round(_at(spec.offset, spec.ramp, frac))
    # Interpolating the window's end (not its length) keeps the windows' span exact.
    end = round(
        _at((spec.offset[0] + spec.batch[0], spec.offset[1] + spec.batch[1]), spec.ramp, frac)
    )
    b = end - start
    acts = torch.zeros(N_SEQ, SEQ_LEN, hidden)
    hot = hot_units(k, s)
    cold = k - hot
    cycle = hot + (torch.arange(SEQ_LEN)[:, None] * cold + torch.arange(cold)[None, :]) % (s - hot)
    cyclic = torch.cat([torch.arange(hot).expand(SEQ_LEN, -1), cycle], dim=1)
    rows = torch.arange(SEQ_LEN)[:, None].expand(-1, k)
    for seq in range(N_SEQ):
        first = start + round(seq * (b - s) / (N_SEQ - 1))
        magnitude = torch.rand(SEQ_LEN, k, generator=gen) + 0.1  # positive: a ReLU's "on"
        acts[seq, rows, first + cyclic] = magnitude
    return acts


def lr_at(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up to PEAK_LR, then cosine decay to 10 %."""
    if step < warmup:
        return PEAK_LR * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return PEAK_LR * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def make_run(
    path: Path,
    layers: Sequence[LayerSpec] | None = None,
    *,
    steps: int = STEPS,
    warmup: int = 100,
    upto: int | None = None,
    name: str | None = None,
    pcts: Sequence[float] = (50, 65, 75, 90),
    seed: int = 0,
) -> Path:
    """Write a run directory; ``upto`` < steps leaves it 'running' at that step."""
    layers = list(paper_like() if layers is None else layers)
    last = steps if upto is None else upto
    path.mkdir(parents=True, exist_ok=True)
    _write_setup(
        path, len(layers), steps, warmup, last, name, "finished" if upto is None else "running"
    )
    gen = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead on a shared machine
    try:
        _log(path, layers, steps, warmup, last, pcts, gen)
    finally:
        torch.set_num_threads(threads)
    return path


def _log(
    path: Path,
    layers: list[LayerSpec],
    steps: int,
    warmup: int,
    last: int,
    pcts: Sequence[float],
    gen: torch.Generator,
) -> None:
    writer = RunWriter(path, pcts, tensorboard=False)
    tracker = LifecycleTracker()
    for step in range(last + 1):
        tokens = step * N_SEQ * SEQ_LEN
        decay = math.exp(-step / 200)
        noise = 0.1 * float(torch.rand(1, generator=gen))
        train = {"lr": lr_at(step, steps, warmup), "loss": 3.0 + 5.0 * decay + noise}
        writer.log_train({"step": step, "tokens": tokens, "grad_norm": 1.0, "step_time_s": 0.1,
                          **train})  # fmt: skip
        if step % 100 == 0:
            val = {"val_loss": 3.1 + 5.0 * decay, "val_acc": 0.5 - 0.4 * decay}
            writer.log_eval({"step": step, "tokens": tokens, "val_ppl": math.exp(val["val_loss"]),
                             **val})  # fmt: skip
        if step % EVERY == 0:
            frac = step / steps
            stats = {
                f"blocks.{i}.mlp.hidden": use_stats(activations(s, frac, gen), percentiles=pcts)
                for i, s in enumerate(layers)
            }
            writer.log_sparsity(step, tokens, stats)
            tracker.update(step, {n: s.batch_used for n, s in stats.items()})
    writer.write_lifecycle(tracker)
    writer.close()


def _write_setup(
    path: Path, n_layers: int, steps: int, warmup: int, step: int, name: str | None, status: str
) -> None:
    model = {"n_layers": n_layers, "d_model": 64, "d_ff": [HIDDEN] * n_layers,
             "activation": "relu", "style": "pre-ln"}  # fmt: skip
    train = {"batch_size": N_SEQ, "seq_len": SEQ_LEN, "lr": PEAK_LR, "warmup_steps": warmup,
             "steps": steps}  # fmt: skip
    data = {"source": "synthetic", "corpus": "fixture", "n_train_tokens": 1_000_000}
    (path / "config.yaml").write_text(
        yaml.safe_dump({"model": model, "train": train, "data": data})
    )
    meta = {
        "run_name": name or path.name, "status": status, "step": step, "steps": steps,
        "model": {**model, "n_params": 123_456}, "data": data, "train": train,
        "precision": "fp32", "device": "cpu", "elapsed_s": 754.0, "arithmetic": "portable",
        "cpu_capability": "AVX2", "mkl_cbwr": "COMPATIBLE", "threads": 2,
    }  # fmt: skip
    (path / "meta.json").write_text(json.dumps(meta))


def make_empty_run(path: Path, name: str | None = None) -> Path:
    """A run that has started but measured nothing: config.yaml and meta.json only."""
    path.mkdir(parents=True, exist_ok=True)
    _write_setup(path, 6, STEPS, 100, 0, name, "running")
    return path
