"""Command-line verb of the analysis (``sparsetrace.cli`` registers it).

The function's signature is its schema: positional parameters are positional arguments, keyword
parameters ``--options``, the first docstring line is the help.
"""

from __future__ import annotations

from pathlib import Path


def analyze(
    model: str,
    revisions: str = "",
    data: str = "embedded",
    tokens: int = 65536,
    batch_size: int = 16,
    seq_len: int = 512,
    out: Path | None = None,
    gated: str = "product",
    layers: str = "",
    device_map: str = "",
) -> None:
    """Hidden-unit use of a pretrained model or checkpoint series, written as a run directory.

    The same tokens pass through every revision; ``sparsetrace report OUT`` draws the result.

    Args:
        model: model directory, directory of step-numbered checkpoints, sparsetrace run, or hub id
        revisions: comma-separated revisions: hub revisions (step1000,...) or local names/steps
        data: text to analyse: embedded, a .txt/.jsonl/.parquet file or directory, hf:NAME
        tokens: tokens per revision, rounded up to whole batches
        batch_size: sequences per batch; the per-batch metric depends on it (paper: 16)
        seq_len: tokens per sequence; the metrics depend on it (paper: 512)
        out: run directory to write; none: runs/analysis-MODEL
        gated: gated MLPs: product = act(gate) * up, the down projection's input; gate = act(gate)
        layers: layers to measure: all (empty), indices "0,5" or a regex on blocks.{i}.mlp.hidden
        device_map: load Hugging Face models with accelerate's device_map (auto, cpu, ...)
    """
    from sparsetrace.analysis.analyze import analyze_model
    from sparsetrace.rundir import load_run
    from sparsetrace.sites import parse_layers

    wanted = [r.strip() for r in revisions.split(",") if r.strip()]
    run_dir = analyze_model(model, wanted, data, tokens, batch_size, seq_len, out, gated,
                            parse_layers(layers), device_map)  # fmt: skip
    run = load_run(run_dir)
    m = run.meta["model"]
    print(
        f"{m['source']}: {m['architecture']}, {m['n_layers']} MLPs, measured: "
        f"{', '.join(m['measured'])}; {run.meta['analysis']['tokens_analysed']:,} tokens per "
        f"revision in batches of {batch_size} x {seq_len}"
    )
    means = run.sparsity.groupby("step")[["per_token_frac", "per_sequence_frac", "per_batch_frac"]]
    print(f"{'step':>10} {'per-token':>10} {'per-seq':>10} {'per-batch':>10}  (% of units, mean)")
    for step, row in means.mean().iterrows():
        print(
            f"{step:>10} {100 * row.per_token_frac:>10.2f} {100 * row.per_sequence_frac:>10.2f} "
            f"{100 * row.per_batch_frac:>10.2f}"
        )
    print(f"run directory: {run_dir}\nreport: sparsetrace report {run_dir}")
