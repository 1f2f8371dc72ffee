"""The experiments' CLI verbs: each function's signature is its command-line schema (see cli.py).

Positional parameters are positional arguments, keyword parameters ``--options`` (bool: a flag),
``overrides`` takes free ``--section.key value`` config overrides; the first docstring line is the
verb's help. docs/experiments.md (Wild & Anderson's experiments) and docs/sparsing-law.md
(``experiment-activations``, ``experiment-width-depth``) describe every verb, its defaults and its
run time.
"""

from __future__ import annotations

from pathlib import Path

from sparsetrace.budgets import SPARSING_TOKENS


def experiment_mask(
    preset: str = "cpu",
    at: int = 0,
    seeds: int = 5,
    prune: bool = False,
    quick: bool = False,
    out: Path | None = None,
    overrides: list[str] | None = None,
) -> None:
    """Masking experiment (paper 4.1.1): control vs dead vs random unit masks from step --at on.

    Args:
        preset: preset name or YAML file (plus --section.key value overrides)
        at: the masking step K; 0 = a quarter of training, at least two warm-ups
        seeds: runs per arm (the verdicts need at least 2; equivalence within the margins
            needs about 5 at the cpu scale's seed-to-seed spread, docs/verdicts.md)
        prune: add an arm with the dead units physically removed (sparsetrace prune)
        quick: a small byte-level model, 300 steps (minutes on a CPU)
        out: experiment directory (default: OUT_DIR/mask-PRESET[-quick])
    """
    from sparsetrace.experiments.mask import run_mask_experiment

    index = run_mask_experiment(preset, at, seeds, prune, quick, out, overrides)
    print(f"report: {index}")


def prune(run: Path, at: int, out: Path | None = None, steps: int | None = None) -> None:
    """Remove the units unused in step AT's batch from a run's checkpoint and train on.

    Args:
        run: the run directory; it must hold a checkpoint at step AT
        at: the step whose batch decides which units are unused (checkpoint step_AT)
        out: the new run directory (default: RUN-pruned-AT next to RUN)
        steps: total training steps of the pruned run (default: the run's own)
    """
    import json

    from sparsetrace.experiments.prune import PRUNE_FILE, prune_run

    out = out or run.with_name(f"{run.name}-pruned-{at}")
    run_dir = prune_run(run, at, out, steps)
    info = json.loads((run_dir / PRUNE_FILE).read_text())
    print(f"pruned {info['pruned_fraction']:.1%} of the units at step {at}: widths "
          f"{info['widths']} of {info['hidden']}")  # fmt: skip
    print(f"run directory: {run_dir}")


def experiment_capacity(
    preset: str = "cpu",
    seeds: int = 2,
    quick: bool = False,
    out: Path | None = None,
    overrides: list[str] | None = None,
) -> None:
    """Capacity round 2 (paper 4.4, Table 4): retrain with each layer as wide as round 1 used.

    Args:
        preset: preset name or YAML file (plus --section.key value overrides)
        seeds: runs per round ("substantially worse" needs at least 2 to be decided)
        quick: a small byte-level model, 300 steps (minutes on a CPU)
        out: experiment directory (default: OUT_DIR/capacity-PRESET[-quick])
    """
    from sparsetrace.experiments.capacity import run_capacity_experiment

    print(f"report: {run_capacity_experiment(preset, seeds, quick, out, overrides)}")


def sweep(
    preset: str = "cpu",
    sweep: str = "",
    name: str = "",
    arm: int = -1,
    list: bool = False,
    quick: bool = False,
    out: Path | None = None,
    overrides: list[str] | None = None,
) -> None:
    """Sensitivity sweep (paper 5, Table 5, Figures 3-4) over config keys or a named grid.

    Args:
        preset: preset name or YAML file (plus --section.key value overrides)
        sweep: KEY=V1,V2,... e.g. train.lr=1e-3,2e-3; several keys separated by ; make a grid
        name: a paper grid scaled to the preset: lr, width or depth (instead of --sweep)
        arm: train only arm I (one process per arm, e.g. a SLURM array job); -1 = all
        list: print the arms (index, status, values) and exit
        quick: a small byte-level model, 300 steps (minutes on a CPU)
        out: experiment directory (default: OUT_DIR/sweep-NAME-PRESET[-quick])
    """
    from sparsetrace.experiments.sweep import run_sweep

    run_sweep(preset, sweep, name, arm, list, quick, out, overrides)


def experiment_activations(
    preset: str = "cpu",
    activations: str = "reglu,swiglu",
    p: float = 1.0,
    tokens: int = SPARSING_TOKENS.experiments,
    quick: bool = False,
    out: Path | None = None,
    overrides: list[str] | None = None,
) -> None:
    """Sparsing Law: activation ratio over training per activation (ReLU falls, SiLU rises?).

    Args:
        preset: preset name or YAML file (plus --section.key value overrides)
        activations: comma-separated model.activation values, one run each; the default is
            the paper's gated ReLU and gated SiLU, act(gate) * up (plain: relu,silu)
        p: PPL-p% sparsity: the perplexity increase allowed, in percent (paper: 1)
        tokens: validation tokens each checkpoint is measured on
        quick: a small byte-level model, 300 steps (minutes on a CPU)
        out: experiment directory (default: OUT_DIR/activations-PRESET[-quick])
    """
    from sparsetrace.experiments.activations import run_activations_experiment

    index = run_activations_experiment(preset, activations, p, tokens, quick, out, overrides)
    print(f"report: {index}")


def experiment_width_depth(
    preset: str = "cpu",
    ratios: str = "",
    activation: str = "reglu",
    p: float = 1.0,
    tokens: int = SPARSING_TOKENS.experiments,
    quick: bool = False,
    out: Path | None = None,
    overrides: list[str] | None = None,
) -> None:
    """Sparsing Law: limit activation ratio vs width-depth ratio at one parameter budget.

    One arm per distinct shape (d_ff = 2.5 d_model, layers filling the preset's non-embedding
    budget), each trained with 8 checkpoints, measured at PPL-p% on all of them and fitted with
    its activation's Sparsing Law. The report: per arm the final and the limit activation ratio
    (A0, 95 % interval), final and limit loss (L_inf of the training loss); the two-segment line
    of A0 over the ratio with its bottleneck r* (bootstrap interval) and the verdict of rule
    width_depth_bottleneck; where the limit loss is lowest.

    Args:
        preset: preset name or YAML file (plus --section.key value overrides)
        ratios: target d_model / n_layers ratios, comma-separated; empty = 3,6,12,24,48,96,192,512
            (cpu: 96x33 to 544x1, 8 arms; --quick: 48x12 to 176x1, 6 arms)
        activation: gated MLP activation (the paper's width-depth study: gated ReLU, reglu;
            swiglu or geglu as options); d_ff = 2.5 d_model
        p: PPL-p% sparsity: the perplexity increase allowed, in percent (paper: 1)
        tokens: validation tokens each checkpoint is measured on
        quick: a small byte-level model, 300 steps (minutes on a CPU)
        out: experiment directory (default: OUT_DIR/width-depth-PRESET[-quick])
    """
    from sparsetrace.experiments.width_depth import run_width_depth_experiment

    index = run_width_depth_experiment(preset, ratios, activation, p, tokens, quick, out, overrides)
    print(f"report: {index}")
