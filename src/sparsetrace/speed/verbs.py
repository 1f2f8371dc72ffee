"""Command-line verb ``sparsetrace speed`` (``sparsetrace.cli`` registers it); the measurement
lives in :mod:`sparsetrace.speed.run`, imported when the verb runs (the parser must not load
torch)."""

from __future__ import annotations

from pathlib import Path

from sparsetrace.errors import UserError

DEFAULT_FRACTIONS = "1,0.5,0.2,0.1,0.05,0.02"


def speed(
    run: Path,
    shape: str = "gpt2-medium",
    fractions: str = DEFAULT_FRACTIONS,
    tokens: int = 32,
    new_tokens: int = 32,
    repeats: int = 5,
    kernel: str = "numba",  # sparse_down.DEFAULT_KERNEL (a literal: the parser must not load torch)
    prune_dead: bool = False,
    out: Path | None = None,
) -> None:
    """Measure how much faster the model's MLP sparsity makes batch-1 decoding on this machine.

    Args:
        run: a trained sparsetrace run (ReLU, ReLU squared, ReGLU: exact; other plain
            activations use the CETT thresholds of its `sparsing-law` measurement) or a Hugging
            Face model directory with a ReLU MLP
        shape: the memory-bound shape measured with this model's sparsity transplanted onto
            random weights: gpt2-medium, opt-350m, gpt2-large or d_model,n_layers,n_heads,d_ff
        fractions: active fractions of the MLP-block sweep (random units, exact count)
        tokens: validation tokens whose activation patterns are measured and timed
        new_tokens: tokens decoded per timed generation
        repeats: timings per point (the fastest is kept)
        kernel: sparse down projection: numba (compiled loops, each thread a chunk of the
            units, eight active rows at a time; ReLU-family MLPs as one call) or embedding_bag
            (torch's, threads over column blocks)
        prune_dead: also decode with the dead units (active on < 0.1 % of 8,192 validation
            tokens) removed from both projections, then sparse
        out: output directory (default: RUN/speed)
    """
    from sparsetrace.speed.run import print_summary, run_speed
    from sparsetrace.speed.sparse_down import KERNELS

    if kernel not in KERNELS:
        raise UserError(f"--kernel must be one of {', '.join(KERNELS)}; got {kernel!r}")
    index = run_speed(run, shape, fractions, tokens, new_tokens, repeats, kernel, prune_dead, out)
    print_summary(index)
    print(f"report: {index}")
