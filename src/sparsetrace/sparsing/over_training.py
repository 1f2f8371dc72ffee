"""PPL-p% activation ratio over a model's checkpoints (Sparsing Law, over training).

As the public scripts do, the CETT c is found once, on the final checkpoints (the PPL ratio
averaged over the last ``last``), and applied to every checkpoint, so that the curve of activation
ratio against tokens seen is measured at one fixed truncation criterion.
"""

from __future__ import annotations

import gc
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from sparsetrace.budgets import SPARSING_TOKENS
from sparsetrace.device import cpu_arithmetic
from sparsetrace.errors import UserError
from sparsetrace.rundir import atomic_write_text, layer_index
from sparsetrace.series import Revision
from sparsetrace.sparsing.cett import GRID_SIZE
from sparsetrace.sparsing.search import (
    PPL_TOL,
    Measurement,
    Subject,
    TokenBatch,
    find_cett,
    search_uncertainty,
    target_ratio,
)
from sparsetrace.sparsing.source import (
    DEFAULT_OPTIONS,
    WINDOWS,
    LawSource,
    ModelOptions,
    describe,
    open_source,
)
from sparsetrace.sparsing.uncertainty import SearchBootstrap

CSV_NAME = "sparsing_law.csv"
JSON_NAME = "sparsing_law.json"
PNG_NAME = "sparsing_law.png"
COLUMNS = ["step", "tokens", "layer", "activation_ratio", "cett", "ppl_ratio"]


def sparsing_law(
    model: str | Path,
    p: float = 1.0,
    tokens: int = SPARSING_TOKENS.law,
    last: int = 5,
    final_only: bool = False,
    replicates: int = 0,
    options: ModelOptions = DEFAULT_OPTIONS,
) -> Path:
    """Activation ratio at PPL-p% sparsity for every revision of ``model`` (a sparsetrace run, a
    Hugging Face model directory, checkpoint series or hub id, read as ``options`` say:
    :mod:`sparsetrace.sparsing.source`) at the CETT c found on the last ``last``
    (``final_only``: the last revision alone, searched on itself); writes ``sparsing_law.csv``
    (step, tokens, layer ('all' or index), activation_ratio, cett, ppl_ratio) and
    ``sparsing_law.json`` into the run directory (a Hugging Face model: ``options.out``);
    returns the CSV's path. ``replicates`` K > 0 repeats the whole measurement of the final
    revision (search and ratio) on K further disjoint sets of as many tokens: their spread is
    the ratio's sampling uncertainty including the search for c, which the bootstrap SE (at
    fixed c) leaves out (:func:`replicate_final`).

    Memory: the last ``last`` models are held at once during the search, then one at a time;
    each layer keeps ``GRID_SIZE + 1`` numbers of its CETT curve, never the activations.
    """
    if not p > 0:
        raise UserError(f"p must be > 0 (percent of perplexity); got {p}")
    if tokens < 1 or last < 1 or replicates < 0 or replicates == 1:
        raise UserError(f"tokens and last must be >= 1, replicates 0 or >= 2 (a spread needs "
                        f"two); got tokens={tokens}, last={last}, "
                        f"replicates={replicates}")  # fmt: skip
    src = open_source(str(model), options, tokens, 1 + replicates)
    revs = src.revisions
    if final_only:
        revs, last = revs[-1:], 1
    last = min(last, len(revs))
    batches = src.batches(tokens)
    if replicates:  # refuse before the measurement, not after it
        src.batches(tokens, token_set=replicates)
    finals = {rev.label: _subject(src, rev, batches) for rev in revs[-last:]}
    search = find_cett(list(finals.values()), p)
    boots = dict(zip(finals, search_uncertainty(list(finals.values()), p), strict=True))
    measured: dict[str, tuple[list[dict[str, Any]], dict[str, Any], int]] = {}

    def measure(rev: Revision, s: Subject) -> None:
        m = s.measure(search.x)
        seen = src.tokens_seen(rev)
        entry = _result(rev, seen, s, m, boots.get(rev.label))
        measured[rev.label] = (measurement_rows(rev.step, seen, m), entry, s.passes)

    # The final revisions first (they are in memory), then the others one at a time.
    for rev in revs[-last:]:
        measure(rev, finals.pop(rev.label))
    _free(src)
    for rev in revs[:-last]:
        measure(rev, _subject(src, rev, batches))
        _free(src)
    rows = [row for rev in revs for row in measured[rev.label][0]]
    results = [measured[rev.label][1] for rev in revs]
    passes = sum(measured[rev.label][2] for rev in revs)
    first_boot = next(iter(boots.values()))
    # Measured before either file is written: the CSV and the JSON change together.
    replicated = replicate_final(src, revs[-1], p, tokens, replicates) if replicates else None
    describe(src, "sparsing_law", {
        "p": p, "tokens": tokens, "last": last, "seq_len": src.seq_len, "data": src.data,
        "revisions": [r.label for r in revs], "device_map": options.device_map or None,
    })  # fmt: skip
    src.out.mkdir(parents=True, exist_ok=True)
    csv = src.out / CSV_NAME
    atomic_write_text(csv, pd.DataFrame(rows, columns=COLUMNS).to_csv(index=False))
    summary = {
        "model": src.model, "kind": src.series.kind, "directory": str(src.out), "p": p,
        "target_ppl_ratio": target_ratio(p),
        "cett": search.x,
        "search": {
            "checkpoints": [r.step for r in revs[-last:]],
            "revisions": [r.label for r in revs[-last:]],
            "mean_ppl_ratio": search.value, "bracket": [search.lo, search.hi],
            "candidates": len(search.points), "ppl_tolerance": PPL_TOL * p / 100,
            "c_interval_95": first_boot.c_interval(), "clipped": first_boot.clipped,
        },
        "tokens_requested": tokens, "tokens_evaluated": sum(b.n_targets for b in batches),
        "windows": WINDOWS, "windows_pool": src.windows_pool, "seq_len": src.seq_len,
        "data": src.data,
        "tokens_per_step": src.tokens_per_step,
        "x": "tokens" if src.tokens_per_step else "steps",
        "grid_size": GRID_SIZE,
        "passes": passes, "checkpoints": results,
        "cpu_arithmetic": cpu_arithmetic(),  # how this process rounded on the CPU
    }  # fmt: skip
    if src.is_run:
        summary["run"] = str(src.out)
    if replicated:
        summary["replicates"] = replicated
    atomic_write_text(src.out / JSON_NAME, json.dumps(summary, indent=2))
    return csv


def _subject(src: LawSource, rev: Revision, batches: list[TokenBatch]) -> Subject:
    model = src.load(rev)
    return Subject(model, batches, src.sites(model))


def _free(src: LawSource) -> None:
    """Return a measured revision's memory before the next loads (on a GPU also the allocator's
    cache: accelerate's device_map sizes placement from the free memory)."""
    gc.collect()
    if src.device.type == "cuda":
        torch.cuda.empty_cache()


def replicate_final(
    src: LawSource, rev: Revision, p: float, tokens: int, sets: int
) -> dict[str, Any]:
    """The whole PPL-p% measurement of revision ``rev`` (search for c on it alone, then the
    ratio) repeated on token sets 1..``sets`` (set 0 is the evaluation set): per set c, PPL
    ratio, activation ratio and its bootstrap SEs (at fixed c, and with the search), and the
    ratios' mean and SD."""
    if sets < 1:
        raise UserError(f"replicates need at least one token set; got {sets}")
    src.batches(tokens, token_set=sets)  # refuse before measuring
    model = src.load(rev)
    sites = src.sites(model)
    rows = []
    for k in range(1, sets + 1):
        batches = src.batches(tokens, token_set=k)
        s = Subject(model, batches, sites)
        c = find_cett([s], p).x
        m = s.measure(c)
        (boot,) = search_uncertainty([s], p)
        rows.append({"token_set": k, "cett": c, "ppl_ratio": m.ppl_ratio,
                     "activation_ratio": m.activation_ratio,
                     "activation_ratio_se": m.activation_ratio_se,
                     "activation_ratio_se_search": boot.se})  # fmt: skip
    ratios = [r["activation_ratio"] for r in rows]
    sd = float(np.std(ratios, ddof=1)) if len(ratios) > 1 else math.nan
    return {"step": rev.step, "tokens_per_set": sum(b.n_targets for b in batches),
            "sets": rows, "mean": float(np.mean(ratios)), "sd": sd}  # fmt: skip


def measurement_rows(step: int, tokens: int | None, m: Measurement) -> list[dict[str, Any]]:
    layers = [
        {"layer": layer_index(name), "activation_ratio": lm.activation_ratio, "cett": lm.cett}
        for name, lm in m.layers.items()
    ]
    overall = {
        "layer": "all", "activation_ratio": m.activation_ratio,
        "cett": sum(lm.cett for lm in m.layers.values()) / len(m.layers),
    }  # fmt: skip
    return [
        {"step": step, "tokens": tokens, **row, "ppl_ratio": m.ppl_ratio}
        for row in [overall, *layers]
    ]


def _result(
    rev: Revision, tokens: int | None, s: Subject, m: Measurement, boot: SearchBootstrap | None
) -> dict[str, Any]:
    """A revision's entry; ``activation_ratio_se_search`` (the SE with the search for c
    included) only for the revisions the search was run on, None (JSON null) for the others;
    ``tokens`` None where the tokens per step are unknown."""
    widths = s.sites.widths
    layers = {str(layer_index(name)): {**asdict(lm), "units": widths[name]}
              for name, lm in m.layers.items()}  # fmt: skip
    return {
        "step": rev.step, "revision": rev.label, "tokens": tokens,
        "activation_ratio": m.activation_ratio,
        "activation_ratio_se": m.activation_ratio_se,
        "activation_ratio_se_search": boot.se if boot is not None else None,
        "dense_activation_ratio": s.reference.dense.mean_activation_ratio,
        "ppl_ratio": m.ppl_ratio, "loss_dense": m.loss_dense, "loss_sparse": m.loss_sparse,
        "layers": layers,
    }  # fmt: skip


def replicates_text(summary: dict) -> str:
    """One sentence on the replicate sets of a ``sparsing_law.json`` summary that has them."""
    rep = summary["replicates"]
    sd = rep["sd"]
    se = float(np.mean([r["activation_ratio_se"] for r in rep["sets"]]))
    se_search = float(np.mean([r.get("activation_ratio_se_search", math.nan)
                               for r in rep["sets"]]))  # fmt: skip
    ratios = ", ".join(f"{r['activation_ratio']:.4f}" for r in rep["sets"])
    versus = f"{ratio_or_nan(sd, se):.1f}x their mean bootstrap SE at fixed c ({se:.4f})"
    if math.isfinite(se_search):
        versus += (
            f" and {ratio_or_nan(sd, se_search):.2f}x the one with the search ({se_search:.4f})"
        )
    return (
        f"Replicates: the whole measurement of step {rep['step']} (c searched on each set) on "
        f"{len(rep['sets'])} further disjoint sets of {rep['tokens_per_set']:,} tokens gives "
        f"{ratios}: SD {sd:.4f} ({ratio_or_nan(sd, rep['mean']):.1%} of their mean), "
        f"{versus} — the uncertainty of one such measurement, the search included."
    )


def ratio_or_nan(a: float, b: float) -> float:
    """a / b, NaN when b is 0 (a replicate SE or mean of exactly 0)."""
    return a / b if b else math.nan
