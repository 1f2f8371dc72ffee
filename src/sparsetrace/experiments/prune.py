"""Physical pruning: remove the units a batch did not use, then train the smaller model on.

Beyond the paper: section 4.1.1 masks the units unused in the batch of step K and suggests
"reshaping your model to exclude unused dimensions" for the rest of training. Here the units are
removed from the checkpoint after K updates: each MLP's ``w_in`` rows (gated: the rows of both
halves) and biases, ``w_out`` columns and ``unit_mask`` entries, the AdamW moments of those
parameters (sliced the same way; step counts kept) and the lifecycle tracker's per-unit arrays.
The result is a new run directory whose config sets ``model.d_ff_per_layer`` to the kept widths
and whose checkpoint ``step_K`` resumes like any other. The pruned model computes what the
dead-masked model computes (a masked unit contributes exactly zero), so its training follows the
dead-mask arm's up to floating-point rounding: a masked unit's weights still move under AdamW
momentum and weight decay, but it never reaches the output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from sparsetrace.checkpoint import (
    checkpoint_path,
    list_checkpoints,
    load_state,
    load_trained_model,
    save_checkpoint,
)
from sparsetrace.config import RunConfig, load_config, to_dict
from sparsetrace.data import prepare_data
from sparsetrace.device import (
    autocast,
    evaluation_device,
    resolve_device,
    resolve_precision,
    use_arithmetic,
)
from sparsetrace.errors import UserError
from sparsetrace.experiments.runs import copy_history, run_to_end
from sparsetrace.metrics import use_stats_from_counts
from sparsetrace.model.transformer import Transformer
from sparsetrace.rundir import atomic_write_text
from sparsetrace.train.loop import model_identity, train_batch
from sparsetrace.train.parallelize import full_model_state

PRUNE_FILE = "prune.json"
UNITS_FILE = "kept_units.json"

# tensor name -> (dimension, indices to keep along it); a layer's hidden name -> its kept units
UnitIndex = dict[str, tuple[int, torch.Tensor]]


@torch.no_grad()
def used_units(model: Transformer, cfg: RunConfig, step: int) -> dict[str, torch.Tensor]:
    """Per layer, which hidden units step ``step``'s batch uses (bool per unit), as the trainer
    measures it: the same batch, precision and use metric."""
    device = resolve_device(cfg.train.device)
    model.to(device)
    x, y = train_batch(cfg, prepare_data(cfg.data), step)
    with autocast(device, resolve_precision(cfg.train.precision, device)):
        out = model(x.to(device), y.to(device), measure=True)
    model.cpu()
    return {
        name: use_stats_from_counts(c, cfg.data.seq_len, []).batch_used.cpu()
        for name, c in out.use_counts.items()
    }


def unit_index(model: Transformer, keep: dict[str, torch.Tensor]) -> UnitIndex:
    """The slices that keep each layer's ``keep`` units, for every tensor with a unit dimension.

    A layer that uses no unit keeps unit 0 (a width must be positive); :func:`prune_model`
    masks it, so that it stays as silent as in the dead-masked model.
    """
    index: UnitIndex = {}
    for name, mlp in model.mlps().items():
        units = keep[name].nonzero()[:, 0]
        if units.numel() == 0:
            units = torch.zeros(1, dtype=torch.long)
        # Gated MLPs: w_in's rows are [gate; up], unit j at rows j and d_ff + j.
        rows = torch.cat([units, units + keep[name].numel()]) if mlp.gated else units
        prefix = name.removesuffix("hidden")
        index[name] = (0, units)
        index[prefix + "w_in.weight"] = (0, rows)
        index[prefix + "w_out.weight"] = (1, units)
        index[prefix + "unit_mask"] = (0, units)
        if mlp.w_in.bias is not None:
            index[prefix + "w_in.bias"] = (0, rows)
    return index


def slice_tensors(tensors: dict[str, torch.Tensor], index: UnitIndex) -> dict[str, torch.Tensor]:
    return {
        k: t.index_select(index[k][0], index[k][1]) if k in index else t for k, t in tensors.items()
    }


def slice_optimizer_state(state: dict[str, Any], index: UnitIndex) -> dict[str, Any]:
    """AdamW's moments sliced like their parameters (the checkpoint keys the optimizer state by
    parameter name); scalars such as the step count kept."""
    sliced = {
        name: {
            k: v.index_select(*index[name]) if name in index and v.dim() > 0 else v
            for k, v in entry.items()
        }
        for name, entry in state["state"].items()
    }
    return {**state, "state": sliced}


def slice_tracker_state(
    state: dict[str, dict[str, torch.Tensor]], index: UnitIndex
) -> dict[str, dict[str, torch.Tensor]]:
    """The lifecycle tracker's per-unit (1-D) arrays sliced; its history of counts (the 2-D
    transitions) kept as measured."""
    return {
        name: {k: v.index_select(*index[name]) if v.dim() == 1 else v for k, v in layer.items()}
        for name, layer in state.items()
    }


def prune_model(model: Transformer, cfg: RunConfig, keep: dict[str, torch.Tensor]) -> Transformer:
    """A model of the kept widths holding the kept units' weights (a layer with no used unit
    keeps one masked unit)."""
    index = unit_index(model, keep)
    widths = [int(index[name][1].numel()) for name in keep]
    pruned = Transformer(replace(cfg.model, d_ff_per_layer=widths))
    pruned.load_state_dict(slice_tensors(model.state_dict(), index))
    for name, mlp in pruned.mlps().items():
        mask = mlp.unit_mask.clone()
        if not keep[name].any():
            mask.zero_()
        mlp.set_unit_mask(mask)  # also refreshes the flag that turns masking on
    return pruned


@dataclass
class Pruning:
    """The pruned state of run ``source`` after ``step`` updates, ready to be written."""

    source: Path
    step: int
    keep: dict[str, torch.Tensor]
    model: Transformer
    state: dict[str, Any]

    @property
    def widths(self) -> list[int]:
        return [int(w) for w in self.model.cfg.widths]

    def info(self, cfg: RunConfig) -> dict[str, Any]:
        hidden = sum(int(k.numel()) for k in self.keep.values())
        return {
            "source": str(self.source.resolve()),
            "step": self.step,
            "steps": cfg.train.steps,
            "widths": self.widths,
            "hidden": [int(k.numel()) for k in self.keep.values()],
            "pruned_fraction": 1 - sum(self.widths) / hidden,
        }

    def write(self, cfg: RunConfig, dest: Path) -> None:
        """The pruned run directory: config, checkpoint ``step_K``, logs before K, prune.json
        (written last: it marks a complete pruning)."""
        dest.mkdir(parents=True, exist_ok=True)
        atomic_write_text(dest / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        save_checkpoint(
            dest, self.step, full_model_state(self.model), {**self.state, "config": to_dict(cfg)}
        )
        copy_history(self.source, dest, self.state["tracker"])
        # The source units each layer kept: its long lists on one line, apart from prune.json.
        units = {name: k.nonzero()[:, 0].tolist() for name, k in self.keep.items()}
        atomic_write_text(dest / UNITS_FILE, json.dumps(units))
        atomic_write_text(dest / PRUNE_FILE, json.dumps(self.info(cfg), indent=2))


def plan_pruning(source: Path, step: int) -> Pruning:
    """Measure step ``step``'s batch on the checkpoint after ``step`` updates and slice away the
    units it does not use: weights, AdamW moments, lifecycle tracker."""
    ckpt = checkpoint_path(source, step)
    if not ckpt.is_dir():
        have = ", ".join(str(int(p.name.removeprefix("step_"))) for p in list_checkpoints(source))
        raise UserError(
            f"{source} has no checkpoint at step {step} (checkpoints at: {have or 'none'})"
        )
    run_cfg = load_config(str(source / "config.yaml"))  # the step's batch computed as trained
    use_arithmetic(run_cfg.train.arithmetic, run_cfg.train.threads,
                   evaluation_device(run_cfg.train.device))  # fmt: skip
    model, cfg = load_trained_model(source, ckpt)
    state = load_state(ckpt)
    keep = used_units(model, cfg, step)
    index = unit_index(model, keep)
    pruned = prune_model(model, cfg, keep)
    new_state = {
        **state,
        "optimizer": slice_optimizer_state(state["optimizer"], index),
        "tracker": slice_tracker_state(state["tracker"], index),
        "model_config": model_identity(pruned.cfg),
    }
    return Pruning(source, step, keep, pruned, new_state)


def pruned_config(p: Pruning, out: Path, steps: int | None) -> RunConfig:
    """The source's config with the kept widths. A mask due at or before the pruning step is
    dropped: its units are already gone (a later one still applies)."""
    overrides = ["--model.d_ff_per_layer", json.dumps(p.widths),
                 "--out_dir", str(out.parent), "--run_name", out.name]  # fmt: skip
    if steps is not None:
        if steps <= p.step:
            raise UserError(f"--steps {steps} must exceed the pruning step {p.step}")
        overrides += ["--train.steps", str(steps)]
    cfg = load_config(str(p.source / "config.yaml"), overrides)
    if cfg.mask.at_step <= p.step:
        cfg.mask.at_step = 0
    return cfg


def prune_run(source: Path, step: int, out: Path, steps: int | None = None) -> Path:
    """Prune ``source`` at ``step`` into the run directory ``out`` and train it to the end;
    a pruned run already in ``out`` (same source and step) is resumed, or left if finished."""
    source, out = Path(source), Path(out)
    info_file = out / PRUNE_FILE
    if info_file.exists():
        info = json.loads(info_file.read_text())
        asked = (str(source.resolve()), step, info["steps"] if steps is None else steps)
        if (info["source"], info["step"], info["steps"]) != asked:
            raise UserError(
                f"{out} holds a pruning of {info['source']} at step {info['step']} "
                f"({info['steps']} steps); pass --out DIR for another one"
            )
        cfg = load_config(str(out / "config.yaml"),
                          ["--out_dir", str(out.parent), "--run_name", out.name])  # fmt: skip
        return run_to_end(cfg)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not a pruned run; pass --out DIR")
    if not (source / "config.yaml").is_file():
        raise UserError(f"{source}: not a run directory (no config.yaml)")
    pruning = plan_pruning(source, step)
    cfg = pruned_config(pruning, out, steps)
    return run_to_end(cfg, seed=lambda dest: pruning.write(cfg, dest))
