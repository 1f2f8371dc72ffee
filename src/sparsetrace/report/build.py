"""Assemble the report from prepared runs: tables, findings, figures, and the run header."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from sparsetrace import __version__, paper
from sparsetrace.claims import HOLDS
from sparsetrace.errors import UserError
from sparsetrace.report import figures
from sparsetrace.report.document import (
    Figure,
    Section,
    Table,
    Text,
    fmt_pct,
    fmt_ratio,
    render_html,
    render_markdown,
    write_csv,
)
from sparsetrace.report.findings import FINDINGS, evaluate, token_batch_correlation
from sparsetrace.report.rundata import (
    EARLY_FRACTION,
    EARLY_WARMUPS,
    LIFECYCLE_COLUMNS,
    RATIO_COLUMNS,
    SCOPE,
    USE_COLUMNS,
    RunData,
    lookup,
    percentile_columns,
    prepare,
)
from sparsetrace.report.sparsing import run_section as sparsing_run_section
from sparsetrace.rundir import load_run

LABELS = {
    "layer": "layer",
    "per_token": "per-token (%)",
    "per_sequence": "per-sequence (%)",
    "per_batch": "per-batch (%)",
    "token_seq_ratio": "token/seq",
    "seq_batch_ratio": "seq/batch",
    "on_first_batch": "on at batch 0 (%)",
    "turned_on": "turned on (%)",
    "turned_off": "turned off (%)",
    "final_use": "final use (%)",
    "never_used": "never used (%)",
}
ROLE_COLUMNS = ("per_token", "per_batch", "turned_on", "turned_off", "p65")


def _label(column: str) -> str:
    return LABELS.get(column) or f"{column} (%)"  # a percentile, in % of the sequence


def _formats(columns: list[str]) -> dict[str, Callable[[Any], str]]:
    return {_label(c): fmt_ratio if c in RATIO_COLUMNS else fmt_pct for c in columns}


def _fmt(column: str, value: float | None) -> str:
    if value is None or math.isnan(value):
        return "–"
    return fmt_ratio(value) if column in RATIO_COLUMNS else fmt_pct(value)


def _fmt_r(r: float) -> str:
    return "n/a (needs three layers that vary)" if math.isnan(r) else f"{r:+.2f}"


def load(run_dirs: list[Path]) -> list[RunData]:
    """Load and prepare runs, giving each a unique display label."""
    if not run_dirs:
        raise UserError("report: give at least one run directory")
    runs = [load_run(p) for p in run_dirs]
    names = [r.name for r in runs]
    labels = []
    for i, run in enumerate(runs):
        label = run.name if names.count(run.name) == 1 else f"{run.name} ({run.path.name})"
        labels.append(label if label not in labels else f"{label} #{i + 1}")
    return [prepare(run, label) for run, label in zip(runs, labels, strict=True)]


# --------------------------------------------------------------------------------------------------
# Header


def _count(n: Any) -> str:
    n = float(n)
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


def _duration(seconds: Any) -> str:
    s = round(float(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 60} min {s % 60} s" if s >= 60 else f"{s} s"


def status(rd: RunData) -> str:
    """'finished' / 'running' / 'failed' / 'unknown', from meta.json."""
    return str(rd.run.meta.get("status") or "unknown")


def progress(rd: RunData) -> str:
    step = rd.run.meta.get("step")
    if step is None and not rd.run.train.empty:
        step = int(rd.run.train["step"].max())
    total = rd.planned_steps
    if step is None:
        return "–"
    if total:
        return f"step {int(step)} of {total} ({100 * int(step) / total:.0f} %)"
    return f"step {int(step)}"


def _overview(rd: RunData) -> dict[str, str]:
    run = rd.run
    d_ff = lookup(run, "model", "d_ff")
    if isinstance(d_ff, list):
        d_ff = d_ff[0] if len(set(d_ff)) == 1 else ", ".join(map(str, d_ff))
    batch, seq = lookup(run, "train", "batch_size"), lookup(run, "train", "seq_len")
    corpus = lookup(run, "data", "corpus") or lookup(run, "data", "name")
    source = lookup(run, "data", "source")
    if isinstance(corpus, dict):  # meta.json describes the corpus in detail
        source, corpus = corpus.get("source", source), corpus.get("name")
    n_tokens = lookup(run, "data", "n_train_tokens")
    measured = rd.series["step"].nunique()
    values = {
        "status": status(rd),
        "progress": progress(rd),
        "sparsity measured": (
            f"{measured} steps, last complete at {rd.end_step}" if measured else "not yet"
        ),
        "layers": lookup(run, "model", "n_layers") or (len(rd.layer_ids) or None),
        "d_model": lookup(run, "model", "d_model"),
        "d_ff": d_ff,
        "activation": lookup(run, "model", "activation"),
        "style": lookup(run, "model", "style"),
        "parameters": _count(p) if (p := lookup(run, "model", "n_params")) else None,
        "data": " / ".join(str(v) for v in (source, corpus) if v) or None,
        "training tokens": _count(n_tokens) if n_tokens else None,
        "batch (sequences × tokens)": (
            f"{batch} × {seq} = {int(batch) * int(seq)}" if batch and seq else batch
        ),
        "peak LR": lookup(run, "train", "lr"),
        "warm-up steps": rd.warmup_steps,
        "precision": lookup(run, None, "precision"),
        "device": lookup(run, None, "device"),
        "CPU arithmetic": _arithmetic(run.meta),
        "elapsed": _duration(e) if (e := run.meta.get("elapsed_s")) else None,
        "missing files": ", ".join(run.missing) or "none",
    }
    return {k: "–" if v is None else str(v) for k, v in values.items()}


def _arithmetic(meta: dict[str, Any]) -> str | None:
    """How a CPU run rounded (docs/training.md): the mode and what its process had."""
    if meta.get("arithmetic") is None or not str(meta.get("device", "cpu")).startswith("cpu"):
        return None
    branch = meta.get("mkl_cbwr") or "unknown"
    had = (f"{meta.get('cpu_capability')} kernels", f"MKL branch {branch}",
           f"{meta.get('threads')} threads")  # fmt: skip
    return f"{meta['arithmetic']} ({', '.join(had)})"


PAPER_OVERVIEW = {
    "status": "published", "progress": f"{paper.TOTAL_STEPS:,} steps", "layers": "6",
    "d_ff": "32768", "activation": "relu", "data": "C4",
    "batch (sequences × tokens)": "16 × 512 = 8192 (per device)", "peak LR": "0.003",
    "warm-up steps": str(paper.WARMUP_STEPS),
}  # fmt: skip


def _runs_section(runs: list[RunData]) -> Section:
    rows = {rd.label: _overview(rd) for rd in runs}
    frame = pd.DataFrame(rows)
    frame[paper.LABEL] = pd.Series(PAPER_OVERVIEW).reindex(frame.index).fillna("–")
    frame.index.name = "setting"
    blocks: list[Any] = []
    for rd in runs:
        blocks += [Text(w, "warning") for w in _warnings(rd)]
        blocks += [Text(f"{rd.label}: {n}.", "note") for n in rd.notes]
    caption = (
        "From meta.json (else config.yaml) of each run directory; the paper's setup: "
        f"{paper.SETUP}."
    )
    blocks.append(Table("runs", "Runs", caption, frame, shaded=paper.LABEL))
    return Section("runs", "Runs", blocks)


def _sparsing_only(rd: RunData) -> bool:
    """A directory of ``sparsetrace sparsing-law`` on a Hugging Face model: no use metrics by
    design (``analyze`` measures those)."""
    return rd.run.meta.get("kind") == "sparsing-law"


def _warnings(rd: RunData) -> list[str]:
    state, where = status(rd), progress(rd)
    if _sparsing_only(rd):
        return []
    if not rd.has_metrics:
        missing = ", ".join(rd.run.missing) or "none"
        doing = "is still training" if state == "running" else f"is {state}"
        return [
            f"{rd.label} {doing} ({where}) and has no sparsity measurements yet: it is left out "
            f"of the tables and figures (missing files: {missing})."
        ]
    out = []
    if state == "running":
        out.append(
            f"{rd.label} is still training ({where}): this report shows its current state at "
            f"step {rd.end_step}, not the end of training."
        )
    elif state == "failed":
        out.append(f"{rd.label} failed ({where}): tables show its last measured state.")
    if "lifecycle.json" in rd.run.missing:
        out.append(f"{rd.label} has no lifecycle.json: Table 2 and the unit-death plot are empty.")
    return out


# --------------------------------------------------------------------------------------------------
# Tables


def _side_by_side(runs: list[RunData], columns: list[str]) -> pd.DataFrame:
    """Per-layer ``columns`` with one column group per run and the paper's group last."""
    groups = {rd.label: rd.layers.reindex(columns=columns) for rd in runs}
    groups[paper.LABEL] = paper.layer_table().reindex(columns=columns)
    frame = pd.concat(groups, axis=1).rename(columns=_label, level=1)
    frame.index.name = "layer"
    return frame.sort_index()


def _layer_table(key: str, title: str, caption: str, runs: list[RunData], cols: list[str]) -> Table:
    frame = _side_by_side(runs, cols)
    return Table(key, title, caption, frame, _formats(cols), shaded=paper.LABEL)


def _when(runs: list[RunData]) -> str:
    parts = [
        f"{rd.label}: step {rd.end_step}" + (" (in progress)" if status(rd) == "running" else "")
        for rd in runs
        if rd.end_step is not None
    ]
    return (
        f"Values at the last measured step of scope '{SCOPE}' ({'; '.join(parts) or 'none'}), "
        "i.e. one device's batch; the paper's batch is 16 × 512 = 8192 tokens, and per-batch use "
        "grows with the number of tokens in the batch."
    )


def _table_sections(runs: list[RunData]) -> list[Section]:
    off6 = [rd for rd in runs if len(rd.layer_ids) != paper.N_LAYERS]
    depths = ", ".join(f"{rd.label} has {len(rd.layer_ids)} layers" for rd in off6)
    align = Text(
        f"Rows align by layer index; {depths}. The paper's findings are about layer roles "
        "(first vs last layer): see 'Layer roles' below.",
        "note",
    )
    t1 = _layer_table(
        "table1", "Table 1: hidden-unit use at the end of training",
        "Per-token, per-sequence and per-batch use in % of the layer's hidden units; token/seq "
        "and seq/batch are the ratios of the unit counts. " + _when(runs),
        runs, [*USE_COLUMNS, *RATIO_COLUMNS],
    )  # fmt: skip
    corr = "; ".join(f"{rd.label}: r = {_fmt_r(token_batch_correlation(rd.layers))}" for rd in runs)
    corr_text = Text(
        f"Pearson correlation across layers between per-token and per-batch use: {corr}. "
        f"The paper states r = {paper.TOKEN_BATCH_CORRELATION:+.2f}; its Table 1 as printed gives "
        f"r = {token_batch_correlation(paper.layer_table()):+.2f}."
    )
    t2 = _layer_table(
        "table2", "Table 2: units on at the first batch, turned on, turned off, final use",
        "% of the layer's hidden units, from lifecycle.json: relative to the first measured "
        "batch, turned on = off then and on in the latest measured batch, turned off = the "
        "reverse; never used = off at the first and at the latest measured batch (Table 2's "
        "arithmetic: 100 % − on at batch 0 − turned on; it does not depend on how often the run "
        "measures). The paper publishes no never-used column: its values here are that "
        f"arithmetic on its Table 2 (the text says 'about {paper.NEVER_USED_PCT:g} %').",
        runs, list(LIFECYCLE_COLUMNS),
    )  # fmt: skip
    pcts = sorted(
        {c for rd in runs for c in percentile_columns(rd.layers)}
        | {f"p{p:g}" for p in paper.TABLE3_PERCENTILES},
        key=lambda c: float(c[1:]),
    )
    t3 = _layer_table(
        "table3", "Table 3: rescaled percentiles of per-sequence unit use",
        "For the units used at least once in a sequence, the Nth percentile of how many of the "
        "sequence's tokens use them, in % of the sequence length, averaged over sequences. "
        + _when(runs),
        runs, pcts,
    )  # fmt: skip
    return [
        Section(
            "table1",
            "Table 1 — use per token, sequence and batch",
            [align, t1, corr_text] if off6 else [t1, corr_text],
        ),
        Section("table2", "Table 2 — units turning on and off", [t2]),
        Section("table3", "Table 3 — how often a used unit fires in a sequence", [t3]),
        _roles_section(runs),
    ]


def _roles_section(runs: list[RunData]) -> Section:
    def roles(layers: pd.DataFrame) -> pd.DataFrame:
        table = layers.reindex(columns=list(ROLE_COLUMNS))
        ends = table.loc[[table.index.min(), table.index.max()]]
        ends.insert(0, "layer", [int(i) for i in ends.index])
        ends.index = ["first layer", "last layer"]
        return ends

    groups = {rd.label: roles(rd.layers) for rd in runs}
    groups[paper.LABEL] = roles(paper.layer_table())
    frame = pd.concat(groups, axis=1).rename(columns=_label, level=1)
    frame.index.name = "role"
    formats = {**_formats(list(ROLE_COLUMNS)), "layer": lambda v: str(int(v))}
    text = Text(
        "The paper describes the first and the last layer as opposite archetypes: layer 0 ends "
        "up using few units per batch (most turned off) but uses them on a large share of each "
        "sequence; the final layer uses the most units per batch, each on few tokens. This "
        "table compares runs with the paper by role, whatever their depth."
    )
    table = Table(
        "roles", "Layer roles: first vs last layer",
        "Same metrics as Tables 1-3, first and last layer of each run.", frame, formats,
        shaded=paper.LABEL,
    )  # fmt: skip
    return Section("roles", "Layer roles — first vs last layer", [text, table])


def _findings_section(runs: list[RunData]) -> Section:
    verdicts = {rd.label: evaluate(rd) for rd in runs}
    rows = {}
    for i, f in enumerate(FINDINGS, 1):
        row: dict[str, Any] = {"finding": f.claim, "where": f.rule.source, "rule": f.rule.line,
                               paper.LABEL: f.paper}  # fmt: skip
        row.update({label: v[f.key] for label, v in verdicts.items()})
        rows[f"F{i}"] = row
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "#"
    intro = Text(
        "Each finding of the paper, decided on each run by a stated rule (docs/verdicts.md has "
        "every rule's threshold and the reason for it). holds / does not hold: the statistic "
        "clears the threshold beyond its uncertainty; inconclusive: it does not, and the verdict "
        "says what would decide it; n/a: the run lacks the data. End-of-training values are "
        "means over the last 10 % of the run with their standard errors; shares of units carry "
        "binomial errors. The paper column applies the same rule to the paper's published "
        "tables, or says that the paper states the claim without numbers."
    )
    table = Table(
        "findings", "Findings", "The rule column states each decision rule in one line.",
        frame, shaded=paper.LABEL,
    )  # fmt: skip
    title = "Findings of the paper, checked on " + ("this run" if len(runs) == 1 else "each run")
    return Section("findings", title, [intro, Text(_scale_note(runs)), table])


def _scale_note(runs: list[RunData]) -> str:
    """How far these runs are from the paper's scale (what the shipped presets showed at theirs:
    docs/reproduction.md, not repeated in a user's report)."""
    seen = [f"{rd.label}: {_count(rd.series['tokens'].max())}" for rd in runs
            if "tokens" in rd.series and not rd.series.empty]  # fmt: skip
    return (
        "Scale decides several of these verdicts. The paper's layer 0 collapses after ~8,000 "
        "steps of 8,192-token batches per device (65M tokens per device; ~2B if its batch was "
        f"data-parallel over 32 cores); training tokens seen here: {', '.join(seen) or 'unknown'}. "
        "What the shipped presets show at their scale: docs/reproduction.md."
    )


# --------------------------------------------------------------------------------------------------
# Figures


def _early_caption(runs: list[RunData]) -> str:
    windows = "; ".join(f"{rd.label}: steps ≤ {rd.early_end()}" for rd in runs if rd.has_metrics)
    return (
        f"Early training = the first {EARLY_FRACTION:.0%} of the planned steps, and at least "
        f"{EARLY_WARMUPS}× the warm-up ({windows}). The paper's Figure 2 shows the first ~70k of "
        "1M steps."
    )


def _ylabel(column: str) -> str:
    """Axis label of a sparsity-log column: per-token/sequence/batch use or a percentile."""
    if column.endswith("_frac"):
        return f"hidden units used {column.removesuffix('_frac').replace('_', ' ')} (%)"
    return f"tokens using the {column[1:]}th-percentile\nunit (% of the sequence)"


def _figure_sections(runs: list[RunData], directory: Path) -> list[Section]:
    def fig(key: str, title: str, caption: str, make: Callable[[], Any]) -> Figure | Text:
        figure = make()
        if figure is None:
            return Text(f"{title}: no data yet.", "note")
        figures.save(figure, directory, key)
        return Figure(key, title, caption)

    def over(column: str, early: bool = False) -> Callable[[], Any]:
        return lambda: figures.layer_metric_figure(runs, column, _ylabel(column), early=early)

    early = _early_caption(runs)
    warm = "The dotted line marks the end of warm-up."
    pct_caption = "Share of a sequence's tokens on which its {}th-percentile used unit fires."
    main = [
        Section("fig1", "Figure 1 — per-batch use over training", [fig(
            "fig1_per_batch", "Figure 1: hidden units used per batch",
            f"Per-batch use over all of training, one line per layer. {warm}",
            over("per_batch_frac"),
        )]),
        Section("fig2", "Figure 2 — early training", [
            fig("fig2a_per_token_early", "Figure 2a: hidden units used per token, early training",
                f"{early} {warm}", over("per_token_frac", early=True)),
            fig("fig2b_p50_early", "Figure 2b: 50th-percentile use, early training",
                f"{pct_caption.format(50)} {early} {warm}", over("p50", early=True)),
        ]),
        Section("deaths", "When do units die", [fig(
            "units_switched_off", "Units switching off over training",
            "Units that were on in the previous measured batch and off in this one, per "
            "measured interval, in % of the layer's units (lifecycle.json transitions); "
            f"dashed: the learning rate (train.csv), right axis. {warm} Paper (§4.2): few units "
            "turn off in the first 8000 steps (warm-up 5000), then many.",
            lambda: figures.deaths_figure(runs),
        )]),
        Section("training", "Training curves", [fig(
            "training_curves", "Loss, validation accuracy and learning rate",
            "Training loss per step (faint) and smoothed; validation loss and next-token "
            "accuracy at each evaluation; the learning-rate schedule.",
            lambda: figures.training_figure(runs),
        )]),
    ]  # fmt: skip
    appendix: list[Figure | Text] = [
        fig("a1_per_token_full", "Hidden units used per token, all of training",
            f"Full-length version of Figure 2a. {warm}", over("per_token_frac")),
        fig("a1_per_sequence_full", "Hidden units used per sequence, all of training",
            f"Units used anywhere in a sequence, averaged over sequences. {warm}",
            over("per_sequence_frac")),
        fig("a1_per_batch_early", "Hidden units used per batch, early training",
            f"Early-training version of Figure 1. {early} {warm}",
            over("per_batch_frac", early=True)),
    ]  # fmt: skip
    pcts = sorted(
        {c for rd in runs for c in percentile_columns(rd.series)}, key=lambda c: float(c[1:])
    )
    for col in pcts:
        name, key, what = f"{col[1:]}th-percentile use", col.replace(".", "_"), col[1:]
        if col != "p50":  # its early version is Figure 2b
            appendix.append(fig(f"a2_{key}_early", f"{name}, early training",
                                f"{pct_caption.format(what)} {early} {warm}",
                                over(col, early=True)))  # fmt: skip
        appendix.append(fig(f"a2_{key}_full", f"{name}, all of training",
                            f"{pct_caption.format(what)} {warm}", over(col)))  # fmt: skip
    return [*main, Section("appendix", "Appendix — full-length and percentile plots", appendix)]


# --------------------------------------------------------------------------------------------------
# Entry points


def build_report(run_dirs: list[Path], out_dir: Path) -> Path:
    """Write index.html, report.md, tables/*.csv and figures/*.{png,svg}; return index.html."""
    runs = load(run_dirs)
    out_dir = Path(out_dir)
    fig_dir, table_dir = out_dir / "figures", out_dir / "tables"
    fig_dir.mkdir(parents=True, exist_ok=True)
    table_dir.mkdir(exist_ok=True)
    # Runs without any measurement yet appear in the header only (with a warning).
    measured = [rd for rd in runs if rd.has_metrics]
    with figures.style():
        sections = [_runs_section(runs)]
        law_only = not measured and any(_sparsing_only(rd) for rd in runs)
        if not law_only:
            sections += [
                _findings_section(measured),
                *_table_sections(measured),
                *_figure_sections(measured, fig_dir),
            ]
        law = sparsing_run_section(runs, fig_dir)  # a model measured by sparsing-law alone too
        if law is not None:
            sections.append(law)
    for section in sections:
        for block in section.blocks:
            if isinstance(block, Table):
                write_csv(block, table_dir / f"{block.key}.csv")
    names = ", ".join(rd.label for rd in runs)
    title = f"sparsetrace report: {names}"
    subtitle = (
        "PPL-p% sparsity (Sparsing Law, Luo et al.) of: "
        if law_only
        else "Layer-dependent activation sparsity, compared with Wild & Anderson, “Uncovering "
        "Layer-Dependent Activation Sparsity Patterns in ReLU Transformers”. Runs: "
    ) + "; ".join(f"{rd.label} ({status(rd)}, {progress(rd)})" for rd in runs)
    footer = (
        f"Generated {dt.datetime.now().isoformat(timespec='seconds')} by sparsetrace "
        f"{__version__} from " + ", ".join(str(rd.run.path) for rd in runs)
    )
    (out_dir / "report.md").write_text(render_markdown(title, subtitle, sections, footer))
    index = out_dir / "index.html"
    index.write_text(render_html(title, subtitle, sections, footer))
    return index


def summary(run_dir: Path) -> str:
    """Tables 1-2 of one run for the terminal: a run line and a paper line per layer."""
    (rd,) = load([run_dir])
    head = f"{rd.label}: {status(rd)}, {progress(rd)}"
    if not rd.has_metrics:
        return f"{head}\nno sparsity measurements yet (missing: {', '.join(rd.run.missing)})"
    cols = [*USE_COLUMNS, *RATIO_COLUMNS, *LIFECYCLE_COLUMNS]
    short = ["token%", "seq%", "batch%", "tok/seq", "seq/batch", "first%", "on%", "off%",
             "final%", "never%"]  # fmt: skip
    ref = paper.layer_table()
    lines = [
        head,
        f"{'end of training' if status(rd) == 'finished' else 'latest measurement'} = step "
        f"{rd.end_step} (scope '{SCOPE}'); {paper.LABEL}",
        f"{'layer':<6}{'':<6}" + "".join(f"{s:>10}" for s in short),
    ]

    def row(values: pd.Series) -> str:
        return "".join(f"{_fmt(c, values.get(c)):>10}" for c in cols)

    for layer in sorted(set(rd.layer_ids) | set(ref.index)):
        mine = rd.layers.loc[layer] if layer in rd.layers.index else pd.Series(dtype=float)
        theirs = ref.loc[layer] if layer in ref.index else pd.Series(dtype=float)
        lines.append(f"{layer:<6}{'run':<6}{row(mine)}")
        lines.append(f"{'':<6}{'paper':<6}{row(theirs)}")
    lines.append(
        f"corr(per-token, per-batch) across layers: {_fmt_r(token_batch_correlation(rd.layers))} "
        f"(paper states {paper.TOKEN_BATCH_CORRELATION:+.2f})"
    )
    verdicts = evaluate(rd)
    held = sum(v.outcome == HOLDS for v in verdicts.values())
    lines.append(f"findings (docs/verdicts.md): {held} of {len(FINDINGS)} hold")
    for i, f in enumerate(FINDINGS, 1):
        lines.append(f"  F{i:<3}{verdicts[f.key].outcome:<14} {f.claim} (paper: {f.paper.outcome})")
    return "\n".join(lines)
