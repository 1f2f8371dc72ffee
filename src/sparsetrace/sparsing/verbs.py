"""Command-line verbs of the Sparsing Law measurements (``sparsetrace.cli`` registers them).

Each function's signature is its schema: positional parameters are positional arguments, keyword
parameters ``--options`` (bool: a flag), the first docstring line is the help.
"""

from __future__ import annotations

import json as jsonlib
from pathlib import Path

from sparsetrace.errors import UserError


def sparsing_law(run: Path, p: float = 1.0, tokens: int = 16384, json: bool = False) -> None:
    """Activation ratio at PPL-p% sparsity over a run's checkpoints (Sparsing Law)."""
    from sparsetrace.sparsing.figures import plot_activation_ratio
    from sparsetrace.sparsing.over_training import JSON_NAME, PNG_NAME
    from sparsetrace.sparsing.over_training import sparsing_law as measure

    csv = measure(run, p=p, tokens=tokens)
    summary = jsonlib.loads((csv.parent / JSON_NAME).read_text())
    png = plot_activation_ratio(csv, csv.parent / PNG_NAME)
    if json:
        print(jsonlib.dumps(summary, indent=2))
        return
    search = summary["search"]
    print(
        f"PPL-{p:g}% sparsity of {run}: CETT c = {summary['cett']:.6g}, mean PPL ratio "
        f"{search['mean_ppl_ratio']:.5f} (target {summary['target_ppl_ratio']:.5f}) over steps "
        f"{', '.join(map(str, search['checkpoints']))}; {summary['tokens_evaluated']:,} tokens"
    )
    print(f"{'step':>9} {'tokens':>14} {'activation':>11} {'dense':>8} {'PPL ratio':>10}")
    for ck in summary["checkpoints"]:
        print(
            f"{ck['step']:>9} {ck['tokens']:>14,} {ck['activation_ratio']:>11.4f} "
            f"{ck['dense_activation_ratio']:>8.4f} {ck['ppl_ratio']:>10.5f}"
        )
    print(f"wrote {csv}, {csv.parent / JSON_NAME}, {png}")


def fit_law(data: Path, form: str = "relu", json: bool = False) -> None:
    """Fit the Sparsing Law (relu or silu form, log baseline) to activation ratio vs tokens."""
    from sparsetrace.sparsing import laws
    from sparsetrace.sparsing.figures import plot_law_fit

    if form not in laws.FORMS:
        raise UserError(f"--form must be one of {', '.join(laws.FORMS)}; got {form!r}")
    tokens, ratio = laws.read_law_data(data)
    fit = laws.fit_law(tokens, ratio, form)
    if json:
        print(jsonlib.dumps(fit.to_dict()))
        return
    data = Path(data)
    name = f"sparsing_law_fit_{form}.png" if data.is_dir() else f"{data.stem}_fit_{form}.png"
    png = plot_law_fit(tokens, ratio, fit, (data if data.is_dir() else data.parent) / name)
    d_lo, d_hi = tokens.min() / 1e9, tokens.max() / 1e9
    print(f"{len(tokens)} points, D = tokens / 1e9 from {d_lo:.4g} to {d_hi:.4g}")
    for law in (fit, fit.baseline):
        params = ", ".join(f"{k} = {v:.4g}" for k, v in law.params.items() if v is not None)
        print(f"{law.form:>5}: {params}; MAE {law.mae:.3e}, MSE {law.mse:.3e}")
    print(f"plot: {png}")
