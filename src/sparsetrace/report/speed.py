"""The speed report: MLP-block and decoding speed-ups against the memory-bandwidth bound."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure as MplFigure

from sparsetrace.report import experiments as rx
from sparsetrace.report import figures
from sparsetrace.report.document import Section, Table, Text
from sparsetrace.rundir import atomic_write_text


def _three(v: float) -> str:
    return f"{v:.3f}"


def speed_figure(block: pd.DataFrame) -> MplFigure:
    """Speed-up of each sparse MLP path against the active fraction: measured points per shape
    and path, the bounds of reading W_in in full (plain 2 / (1 + a); gated with a dense gate
    3 / (1 + 2a)) and the oracle-predictor bound 1 / a."""
    with figures.style():
        fig = MplFigure(figsize=figures.SINGLE, dpi=figures.DPI, layout="constrained")
        ax = fig.add_subplot()
        a = np.geomspace(max(block["active fraction"].min(), 1e-3) * 0.8, 1.0, 100)
        ax.plot(a, 2 / (1 + a), color="black", lw=1, label="bound: read W_in + a·W_out")
        ax.plot(a, 3 / (1 + 2 * a), color="black", lw=1, ls="--",
                label="bound, gated: W_gate + a·(W_up + W_out)")  # fmt: skip
        ax.plot(a, 1 / a, color="grey", lw=1, ls=":", label="oracle predictor: 1 / a")
        colours = {shape: f"C{i}" for i, shape in enumerate(block["shape"].unique())}
        markers = {path: m for path, m in zip(block["path"].unique(), "osD^v<>p", strict=False)}
        for (shape, pattern, path), rows in block.groupby(["shape", "pattern", "path"],
                                                          sort=False):  # fmt: skip
            rows = rows.sort_values("active fraction")
            random = pattern == "random"
            ax.plot(rows["active fraction"], rows["speed-up"], marker=markers.get(path, "o"),
                    ms=5 if random else 8, ls="-" if random else "none", color=colours[shape],
                    mfc=colours[shape] if random else "none",
                    label=f"{shape}: {path} ({pattern})")  # fmt: skip
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xscale("log")
        ax.set_ylim(0, max(6.0, float(block["speed-up"].max()) * 1.1))
        ax.set_xlabel("active fraction of MLP units per token")
        ax.set_ylabel("MLP block speed-up over dense")
        ax.legend(fontsize=5)
    return fig


def _screen_table(rows: list[dict], inexact: float | None, budget: float | None) -> Table:
    chosen = ""
    if budget is not None:
        which = (f"margin {inexact:g}" if inexact is not None
                 else "none (no margin below 1 stayed within it)")  # fmt: skip
        chosen = (" The inexact screen timed in the MLP block and decoding tables is the "
                  f"smallest margin below 1 whose perplexity ratio stayed within {budget:g} "
                  f"here (chosen on these tokens): {which}.")  # fmt: skip
    return Table(
        "screen", "The int8 screen as a predictor of the active units",
        "Per margin on the error bound (1: the whole Cauchy-Schwarz bound, exact; 0: the sign "
        "of the int8 estimate alone): the fraction of units left as candidates (float32 rows "
        "read), the recall of the units active in the dense model, and the perplexity of the "
        "screened model over the dense one, on validation tokens." + chosen,
        pd.DataFrame(rows), {c: (lambda v: f"{v:.4f}") for c in rows[0]},
    )  # fmt: skip


def write_speed_report(out: Path, result: dict) -> Path:
    """speed.json and report/ (index.html, report.md, tables, figure); returns index.html."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "speed.json", json.dumps(result, indent=2))
    block, decode = pd.DataFrame(result["block"]), pd.DataFrame(result["decode"])
    report = out / "report"
    fmt = {c: _three for c in block.columns if c not in ("shape", "pattern", "path")}
    block_table = Table(
        "mlp_block", "MLP block, one token, per layer",
        "Dense vs sparse time per layer and token. Paths: 'W_out rows' reads W_in in full and "
        "the active units' rows of W_out; 'W_up + W_out rows' (gated ReLU) the gate in full and "
        "the active units' rows of W_up and W_out; 'int8 screen' reads an int8 copy of W_in "
        "(the gate) in full and float32 rows only of the candidate units it cannot rule out "
        "(candidate fraction), exact; 'int8 screen at margin m' shrinks its error bound by m, "
        "inexact: recall = the fraction of the dense model's active units it kept, on the "
        "timed tokens (its perplexity cost on the trained model: the screen table; random "
        "weights have none). Bound = the bytes the path read over the read bandwidth measured "
        "in this run; 'of bound' = bound time / measured time. 'measured' rows use the trained "
        "model's own activations (for the wide shape: its active units per token tiled onto "
        "random weights); 'random' rows exactly a·d_ff random units; 'transplanted fraction' "
        "rows random weights whose biases give each layer the trained layer's active fraction.",
        block, fmt,
    )  # fmt: skip
    decode_table = Table(
        "decode", "Greedy batch-1 decoding with a KV cache",
        "New tokens per second after a 16-token prompt; the bound reads every parameter once per "
        "token, minus what the sparse modules skipped (inactive rows of W_out; of W_up for "
        "gated ReLU; W_in's rows ruled out by the int8 screen, plus its int8 copy).",
        decode, {c: _three for c in decode.columns if c != "model"},
    )  # fmt: skip
    figure = rx.figure_block(
        report / "figures", "speedup", "MLP block speed-up vs active fraction",
        "Measured speed-ups and the memory bounds. A plain MLP that reads all of W_in to know "
        "which units are active cannot beat 2 / (1 + a) (a gated one 3 / (1 + 2a)); the int8 "
        "screen, an exact predictor of the active units, can go past that bound (its own, "
        "2 / (1/4 + c + a), is in the table) towards 1 / a.",
        speed_figure(block),
    )  # fmt: skip
    note = Text(
        f"Machine: {result['machine']}, {result['threads']} threads, read bandwidth "
        f"{result['bandwidth_GBps']:.1f} GB/s at the start and "
        f"{result['bandwidth_end_GBps']:.1f} GB/s at the end (the fastest of a sum, torch's "
        "GEMV and the numba GEMV over 1 GiB; the bounds use the higher of the two). Kernel: "
        f"{result['kernel']}. Model activation: "
        f"{result['activation']}"
        + ("" if result["thresholds"] is None else " with PPL-p% CETT thresholds")
        + f". The {result['shape']} rows use random weights with this model's measured "
        "sparsity transplanted; they are not that published model.",
        "note",
    )  # fmt: skip
    if result.get("pruning"):
        pr = result["pruning"]
        removed = ", ".join(f"{r}/{w}" for r, w in zip(pr["removed"], pr["width"], strict=True))
        note.text += (
            f" Dead units pruned (active on < 0.1 % of {pr['dead_tokens']:,} validation tokens),"
            f" per layer: {removed}; perplexity of the pruned model / dense on those tokens: "
            f"{pr['ppl_ratio']:.5f}."
        )
    sections = [
        Section("setup", "Setup", [note]),
        Section("block", "MLP block", [figure, block_table]),
        Section("decode", "Decoding", [decode_table]),
    ]
    if result.get("screen"):
        table = _screen_table(result["screen"], result.get("inexact_margin"),
                              result.get("ppl_budget"))  # fmt: skip
        sections.append(Section("screen", "Predicting the active units", [table]))
    return rx.write_document(report, "Sparse MLP inference speed", str(result["run"]), sections)
