"""Command-line verbs of the Sparsing Law measurements (``sparsetrace.cli`` registers them).

Each function's signature is its schema: positional parameters are positional arguments, keyword
parameters ``--options`` (bool: a flag), the first docstring line is the help.
"""

from __future__ import annotations

import json as jsonlib
import sys
from pathlib import Path

from sparsetrace.budgets import SPARSING_TOKENS
from sparsetrace.errors import UserError


def sparsing_law(
    model: str,
    p: float = 1.0,
    tokens: int = SPARSING_TOKENS.law,
    final_only: bool = False,
    replicates: int = 0,
    revisions: str = "",
    data: str = "embedded",
    seq_len: int = 0,
    tokens_per_step: int = 0,
    search_last: int = 5,
    device: str = "",
    device_map: str = "",
    out: Path | None = None,
    modules: str = "",
    json: bool = False,
) -> None:
    """Activation ratio at PPL-p% sparsity over a model's checkpoints (Sparsing Law).

    Args:
        model: a sparsetrace run, a Hugging Face model directory, a directory of them (a
            checkpoint series, step-numbered names) or a hub id
        p: perplexity increase allowed, in percent (paper: 1)
        tokens: evaluation tokens, a random sample of windows (a run: of its validation split;
            32,768: SE 0.7 % with the search for c on the cpu model;
            results/sparsing-law-token-spread-cpu.md)
        final_only: the last checkpoint alone (minutes less; no over-training curve)
        replicates: repeat the final checkpoint's whole measurement (search for c included) on
            this many further disjoint token sets: the spread the bootstrap SE leaves out
        revisions: comma-separated revisions of a series or hub id (names or step numbers)
        data: a Hugging Face model's evaluation text: embedded, a .txt/.jsonl/.parquet file or
            directory, hf:NAME (a run uses its validation split)
        seq_len: a Hugging Face model's window (0: 512, capped by its context)
        tokens_per_step: a Hugging Face series' training tokens per step (Pythia: 2097152), for
            the over-training axis; 0: unknown, the curve and fit are over steps
        search_last: checkpoints the CETT c is searched on, the last ones (all are held in memory
            during the search; 1 keeps one model in memory at a time)
        device: where to measure (cpu, cuda, cuda:N; default: a run's training device if
            present, else CUDA when available)
        device_map: load Hugging Face models with accelerate's device_map (auto, cpu, ...)
        out: a Hugging Face model's result directory (default runs/sparsing-MODEL; an analyze
            output directory works and keeps its files)
        modules: comma-separated dotted paths of the MLP down projections, in layer order, for
            an architecture sparsetrace does not locate itself
        json: print the summary as JSON
    """
    from sparsetrace.sparsing.figures import plot_activation_ratio
    from sparsetrace.sparsing.over_training import JSON_NAME, PNG_NAME, replicates_text
    from sparsetrace.sparsing.over_training import sparsing_law as measure
    from sparsetrace.sparsing.source import ModelOptions

    options = ModelOptions(_names(revisions), data, seq_len, tokens_per_step, device, device_map,
                           out, _names(modules))  # fmt: skip
    csv = measure(model, p, tokens, search_last, final_only, replicates, options)
    summary = jsonlib.loads((csv.parent / JSON_NAME).read_text())
    png = plot_activation_ratio(csv, csv.parent / PNG_NAME)
    fit = _fit_over_training(csv.parent, summary)
    if json:
        print(jsonlib.dumps(summary, indent=2))
        return
    search = summary["search"]
    print(
        f"PPL-{p:g}% sparsity of {model}: CETT c = {summary['cett']:.6g}, mean PPL ratio "
        f"{search['mean_ppl_ratio']:.5f} (target {summary['target_ppl_ratio']:.5f}) over "
        f"{', '.join(search['revisions'])}; {summary['tokens_evaluated']:,} tokens"
    )
    print(f"{'step':>9} {'tokens':>14} {'activation':>11} {'± se':>8} {'± search':>9} "
          f"{'dense':>8} {'PPL ratio':>10}")  # fmt: skip
    for ck in summary["checkpoints"]:
        se_search = ck["activation_ratio_se_search"]  # None: c was not searched on it
        search_col = "" if se_search is None else f"{se_search:.4f}"
        seen = "unknown" if ck["tokens"] is None else f"{ck['tokens']:,}"
        print(
            f"{ck['step']:>9} {seen:>14} {ck['activation_ratio']:>11.4f} "
            f"{ck['activation_ratio_se']:>8.4f} {search_col:>9} "
            f"{ck['dense_activation_ratio']:>8.4f} {ck['ppl_ratio']:>10.5f}"
        )
    lo, hi = search["c_interval_95"]
    print(
        f"± se: bootstrap over sequences at this c; ± search: with the search for c redone on "
        f"each resample (the checkpoints c was searched on; c 95 % interval {lo:.3g}-{hi:.3g})"
    )
    if "replicates" in summary:
        print(replicates_text(summary))
    if fit:
        print(fit)
    print(f"wrote {csv}, {csv.parent / JSON_NAME}, {png}")


def _names(text: str) -> tuple[str, ...]:
    """A comma-separated list of the command line."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _fit_over_training(directory: Path, summary: dict) -> str:
    """The Sparsing Law fitted to the measured curve (its figure written next to it): one line,
    or '' when there are too few checkpoints or the fit fails."""
    from sparsetrace.sparsing import laws
    from sparsetrace.sparsing.figures import plot_law_fit

    if len(summary["checkpoints"]) < laws.MIN_POINTS:
        return ""
    try:
        form = laws.run_law_form(directory)
    except UserError as err:  # an activation the laws do not cover
        return f"law fit: none ({err})"
    if form is None:
        return ("law fit: none (the activation is unknown; `sparsetrace fit-law DIR --form relu` "
                "or `--form silu` fits one)")  # fmt: skip
    skip = laws.run_warmup_points(directory) or 0
    try:  # step 0 is left out; too few points left or a constant curve: no fit
        tokens, ratio = laws.read_law_data(directory)
        fit = laws.fit_law(tokens, ratio, form, min(skip, len(tokens) - laws.MIN_POINTS))
    except (ValueError, UserError) as err:
        return f"law fit: none ({err})"
    png = plot_law_fit(tokens, ratio, fit, directory / f"sparsing_law_fit_{form}.png")
    lo, hi = fit.a0_low_high
    unit = (
        ""
        if summary["x"] == "tokens"
        else (
            " (over steps: the tokens per step are unknown; A0 and alpha do not depend on the unit)"
        )
    )
    caveat = ""
    if fit.limit_undetermined:
        caveat = f" — {fit.limit_undetermined}: the curve does not determine the limit"
    elif fit.limit_flat:
        caveat = " — the curve has flattened: A0 is its extreme measured value, one-sided"
    return (f"{form} law over {len(tokens) - fit.skip} checkpoints{unit}: limit A0 = "
            f"{fit.limit:.4g} [{lo:.4g}, {hi:.4g}], MSE {fit.mse:.2e}{caveat}; {png}")  # fmt: skip


def sparsing_baselines(
    model: str, p: float = 1.0, tokens: int = SPARSING_TOKENS.baselines,
    definition: str = "reference",
    data: str = "embedded", seq_len: int = 0, device: str = "", device_map: str = "",
    out: Path | None = None, modules: str = "", json: bool = False,
) -> None:  # fmt: skip
    """PPL-p% sparsity vs the Top-k and FAT-ε baselines at the same PPL on a model's final
    checkpoint.

    Args:
        model: a sparsetrace run, a Hugging Face model directory, a directory of them (the last
            is measured) or a hub id
        p: perplexity increase allowed, in percent, for all three methods (paper: 1)
        tokens: evaluation tokens, a random sample of windows (a run: of its validation split)
        definition: the baselines' definition: reference (the public code's: on act(gate), Top-k
            over the whole batch), ours (on the product act(gate) * up, Top-k per token) or both
        data: a Hugging Face model's evaluation text (a run uses its validation split)
        seq_len: a Hugging Face model's window (0: 512, capped by its context)
        device: where to measure (default: a run's training device if present, else CUDA when
            available)
        device_map: load Hugging Face models with accelerate's device_map (auto, cpu, ...)
        out: a Hugging Face model's result directory (default runs/sparsing-MODEL)
        modules: comma-separated dotted paths of the MLP down projections, in layer order
        json: print the summary as JSON
    """
    from sparsetrace.sparsing.comparison import (
        DEFINITIONS,
        JSON_NAME,
        METHOD_NAMES,
        compare_baselines,
    )
    from sparsetrace.sparsing.source import ModelOptions

    if definition not in (*DEFINITIONS, "both"):
        raise UserError(f"--definition must be {', '.join(DEFINITIONS)} or both; "
                        f"got {definition!r}")  # fmt: skip
    definitions = DEFINITIONS if definition == "both" else (definition,)
    options = ModelOptions((), data, seq_len, 0, device, device_map, out, _names(modules))
    summary = compare_baselines(model, p, tokens, definitions, options)
    if json:
        print(jsonlib.dumps(summary, indent=2))
        return
    print(f"{summary['revision']} of {model}: every method at PPL ratio "
          f"{summary['target_ppl_ratio']:.4f} on {summary['tokens_evaluated']:,} "
          "tokens")  # fmt: skip
    print(f"{'method':<22} {'parameter':>24} {'95 % interval':>17} {'activation':>11} "
          f"{'± search':>9} {'PPL ratio':>10}")  # fmt: skip
    for row in summary["methods"]:
        name = f"{METHOD_NAMES[row['method']].format(p=p)} {row['definition']}".strip()
        lo, hi = row["interval_95"]
        print(f"{name:<22} {row['parameter'] + ' = ' + format(row['value'], '.4g'):>24} "
              f"{f'{lo:.4g}-{hi:.4g}':>17} {row['activation_ratio']:>11.4f} "
              f"{row['se_search']:>9.4f} {row['ppl_ratio']:>10.5f}")  # fmt: skip
        if row["clipped"]:
            print(f"  {row['clipped']:.1%} of the resamples did not reach the target within the "
                  "evaluated parameters: its SE is a lower bound")  # fmt: skip
    for d in summary["differences"]:
        name = f"{METHOD_NAMES[d['method']]} ({d['definition']})"
        print(
            f"activation ratio of {name} minus PPL-{p:g}%'s: {100 * d['minus_cett']:+.2f} ± "
            f"{100 * d['se']:.2f} points (paired bootstrap SE, both searches redone on each "
            "resample)"
        )
    print(f"wrote {Path(summary['directory']) / JSON_NAME}")


def fit_law(
    data: Path,
    form: str | None = None,
    skip_first: int | None = None,
    bootstrap: int = 0,
    json: bool = False,
) -> None:
    """Fit the Sparsing Law (relu or silu form; log and sigmoid-like baselines) to activation
    ratio vs tokens; prints the limit A0 the model converges to, with its 95 % interval.

    Args:
        data: a CSV (tokens, activation_ratio), a run directory (its sparsing_law.csv) or the
            Sparsing Law authors' JSON
        form: relu (falling, exp(-c D^alpha + b) + A0) or silu (rising, -c D^-alpha + A0)
            (default: for a run directory its activation's form, e.g. silu for swiglu; for a
            file relu)
        skip_first: points dropped from the start (default: for a run directory its checkpoints
            taken during warm-up, the authors' rule; for a file 0)
        bootstrap: residual bootstrap resamples for A0's interval (0: the fit's covariance)
        json: print one JSON object instead of text and a plot
    """
    from sparsetrace.sparsing import laws
    from sparsetrace.sparsing.figures import plot_law_fit

    if form is None and Path(data).is_dir():
        form = laws.run_law_form(data)
        if form is None:
            print(f"{data}: activation unknown (config.yaml missing, unreadable or without "
                  "model.activation): the relu form", file=sys.stderr)  # fmt: skip
    form = form or "relu"
    if form not in laws.FORMS:
        raise UserError(f"--form must be one of {', '.join(laws.FORMS)}; got {form!r}")
    tokens, ratio = laws.read_law_data(data)
    why = f"--skip-first {skip_first}"
    if skip_first is None and Path(data).is_dir():
        skip_first = laws.run_warmup_points(data)
        if skip_first is None:
            print(f"{data}: warm-up unknown (no readable config.yaml): no checkpoint dropped",
                  file=sys.stderr)  # fmt: skip
            skip_first = 0
        why = f"dropping the {skip_first} taken during warm-up (--skip-first 0 keeps them)"
    skip_first = skip_first or 0
    if not 0 <= skip_first <= len(tokens) - laws.MIN_POINTS:
        raise UserError(f"{why} leaves {len(tokens) - skip_first} of {len(tokens)} points; "
                        f"fitting needs {laws.MIN_POINTS}")  # fmt: skip
    if bootstrap < 0:
        raise UserError(f"--bootstrap must be >= 0, got {bootstrap}")
    try:
        fit = laws.fit_law(tokens, ratio, form, skip_first, bootstrap)
    except ValueError as err:  # e.g. the points left after --skip-first are constant
        raise UserError(f"{data}: {err}") from None
    if json:
        print(jsonlib.dumps(fit.to_dict()))
        return
    data = Path(data)
    name = f"sparsing_law_fit_{form}.png" if data.is_dir() else f"{data.stem}_fit_{form}.png"
    png = plot_law_fit(tokens, ratio, fit, (data if data.is_dir() else data.parent) / name)
    d_lo, d_hi = tokens.min() / 1e9, tokens.max() / 1e9
    print(f"{len(tokens)} points, D = tokens / 1e9 from {d_lo:.4g} to {d_hi:.4g}; fitted on the "
          f"last {len(tokens) - fit.skip} (--skip-first {fit.skip})")  # fmt: skip
    lo, hi = fit.a0_low_high
    how = f"bootstrap, {bootstrap} resamples" if bootstrap else "the fit's covariance"
    print(f"limit activation ratio A0 = {fit.limit:.4g}, 95 % interval [{lo:.4g}, {hi:.4g}] "
          f"({how})" + (f" — {fit.limit_undetermined}: the curve does not determine the limit"
                        if fit.limit_undetermined else ""))  # fmt: skip
    for law in (fit, *fit.baselines.values()):
        params = ", ".join(f"{k} = {v:.4g}" for k, v in law.params.items() if v is not None)
        print(f"{law.form:>7}: {params}; MAE {law.mae:.3e}, MSE {law.mse:.3e}")
    print(f"plot: {png}")
