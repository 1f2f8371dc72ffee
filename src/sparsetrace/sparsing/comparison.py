"""PPL-p% sparsity against the Sparsing Law's baselines on one checkpoint, at the same PPL.

The paper's argument for PPL-p% sparsity (its Section 3 and Figure 3) is that at the same perplexity
cost it keeps fewer units than Top-k and FAT-ε. :func:`compare_baselines` measures the three on the
final checkpoint of a run or a Hugging Face model, each matched to PPL ratio ``1 + p/100`` on the
same tokens, with each activation ratio's SE with its own search (or match) redone on every
bootstrap resample. The resamples are the same for all methods, so each baseline's difference from
PPL-p% has a paired SE that includes both searches.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from sparsetrace.budgets import SPARSING_TOKENS
from sparsetrace.errors import UserError
from sparsetrace.rundir import atomic_write_text
from sparsetrace.sparsing.baselines import Definition, match_ppl, strength
from sparsetrace.sparsing.search import Subject, ppl_sparsity, target_ratio
from sparsetrace.sparsing.source import (
    DEFAULT_OPTIONS,
    WINDOWS,
    ModelOptions,
    describe,
    open_source,
)

JSON_NAME = "sparsing_baselines.json"
DEFINITIONS: tuple[Definition, ...] = ("reference", "ours")
PARAMETER = {"cett": "c", "topk": "kept fraction k", "fat": "eps"}
METHOD_NAMES = {"cett": "PPL-{p:g}% (CETT)", "topk": "Top-k", "fat": "FAT-ε"}  # .format(p=p)


def compare_baselines(
    model: str | Path,
    p: float = 1.0,
    tokens: int = SPARSING_TOKENS.baselines,
    definitions: tuple[str, ...] = ("reference",),
    options: ModelOptions = DEFAULT_OPTIONS,
) -> dict[str, Any]:
    """PPL-p% sparsity, Top-k and FAT-ε (each baseline in every definition of ``definitions``) on
    the final revision of ``model`` (a run or a Hugging Face model:
    :mod:`sparsetrace.sparsing.source`), all at PPL ratio 1 + p/100 on the same ``tokens``
    tokens; writes ``sparsing_baselines.json`` into the run (or ``options.out``) and returns its
    content."""
    if not p > 0 or tokens < 1:
        raise UserError(f"p must be > 0 and tokens >= 1; got p={p}, tokens={tokens}")
    unknown = set(definitions) - set(DEFINITIONS)
    if unknown or not definitions:
        raise UserError(f"definitions must be among {', '.join(DEFINITIONS)}; "
                        f"got {', '.join(definitions) or 'none'}")  # fmt: skip
    src = open_source(str(model), options, tokens)
    final = src.revisions[-1]
    batches = src.batches(tokens)
    if sum(len(b.inputs) for b in batches) < 2:
        raise UserError(f"--tokens {tokens} gives one sequence of {src.seq_len} tokens: the "
                        "uncertainties need two or more")  # fmt: skip
    model = src.load(final)
    subject = Subject(model, batches, src.sites(model))
    cett = ppl_sparsity(subject, p, search_se=True)
    m, boot = cett.measurement, cett.uncertainty
    methods = [{
        "method": "cett", "definition": "", "parameter": PARAMETER["cett"],
        "value": cett.search.x, "activation_ratio": m.activation_ratio, "ppl_ratio": m.ppl_ratio,
        "se_fixed": m.activation_ratio_se, "se_search": boot.se,
        "interval_95": list(boot.c_interval()), "clipped": boot.clipped,
        "layers": {name: layer.activation_ratio for name, layer in m.layers.items()},
    }]  # fmt: skip
    differences = []
    for definition in definitions:
        for baseline in ("topk", "fat"):
            point = match_ppl(subject, baseline, p, definition, search_se=True)
            methods.append({
                "method": baseline, "definition": definition, "parameter": PARAMETER[baseline],
                "value": point.param, "activation_ratio": point.activation_ratio,
                "ppl_ratio": point.ppl_ratio, "se_fixed": point.activation_ratio_se,
                "se_search": point.uncertainty.se,
                "interval_95": _parameter_interval(baseline, point.uncertainty.c_interval()),
                "clipped": point.uncertainty.clipped, "layers": point.layers,
            })  # fmt: skip
            paired = point.uncertainty.ratio - boot.ratio  # the same resamples, row by row
            differences.append({
                "method": baseline, "definition": definition,
                "minus_cett": point.activation_ratio - m.activation_ratio,
                "se": float(np.std(paired, ddof=1)),
            })  # fmt: skip
    summary = {
        "model": src.model, "directory": str(src.out), "step": final.step,
        "revision": final.label, "p": p,
        "target_ppl_ratio": target_ratio(p), "tokens_requested": tokens,
        "tokens_evaluated": sum(b.n_targets for b in batches), "windows": WINDOWS,
        "passes": subject.passes, "methods": methods, "differences": differences,
    }  # fmt: skip
    if src.is_run:
        summary["run"] = str(src.out)
    describe(src, "sparsing_baselines", {"p": p, "tokens": tokens, "seq_len": src.seq_len,
                                         "data": src.data, "revisions": [final.label],
                                         "device_map": options.device_map or None})  # fmt: skip
    atomic_write_text(src.out / JSON_NAME, json.dumps(summary, indent=2))
    return summary


def _parameter_interval(baseline: str, interval: tuple[float, float]) -> list[float]:
    """The resamples' 95 % interval of a baseline's strength, in its parameter (ascending)."""
    return sorted(strength(baseline, s) for s in interval)
