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
    """Speed-up of the sparse MLP block against the active fraction: measured points per shape,
    the memory bound 2 / (1 + a) of a plain MLP, and the oracle-predictor bound 1 / a."""
    with figures.style():
        fig = MplFigure(figsize=figures.SINGLE, dpi=figures.DPI, layout="constrained")
        ax = fig.add_subplot()
        a = np.geomspace(max(block["active fraction"].min(), 1e-3) * 0.8, 1.0, 100)
        ax.plot(a, 2 / (1 + a), color="black", lw=1, label="bound: read W_in + a·W_out")
        colours = {shape: f"C{i}" for i, shape in enumerate(block["shape"].unique())}
        for (shape, pattern), rows in block.groupby(["shape", "pattern"], sort=False):
            rows = rows.sort_values("active fraction")
            random = pattern == "random"
            ax.plot(rows["active fraction"], rows["speed-up"], marker="o" if random else "*",
                    ms=7 if random else 14, ls="-" if random else "none", color=colours[shape],
                    label=f"{shape} ({pattern} units)")  # fmt: skip
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("active fraction of MLP units per token")
        ax.set_ylabel("MLP block speed-up over dense")
        ax.legend(fontsize=7)
    return fig


def write_speed_report(out: Path, result: dict) -> Path:
    """speed.json and report/ (index.html, report.md, tables, figure); returns index.html."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "speed.json", json.dumps(result, indent=2))
    block, decode = pd.DataFrame(result["block"]), pd.DataFrame(result["decode"])
    report = out / "report"
    fmt = {c: _three for c in block.columns if c not in ("shape", "pattern")}
    block_table = Table(
        "mlp_block", "MLP block, one token, per layer",
        "Dense vs sparse time per layer and token; bound = bytes of W_in plus the active rows of "
        "W_out over the read bandwidth measured in this run; 'of bound' = bound time / "
        "measured time. 'measured' rows use the trained model's own active units per token "
        "(transplanted: tiled onto the wider layer); 'random' rows exactly a·d_ff random units.",
        block, fmt,
    )  # fmt: skip
    decode_table = Table(
        "decode", "Greedy batch-1 decoding with a KV cache",
        "New tokens per second after a 16-token prompt; the bound reads every parameter once per "
        "token, minus the inactive rows of each W_out at the measured sparsity.",
        decode, {c: _three for c in decode.columns if c != "model"},
    )  # fmt: skip
    figure = rx.figure_block(
        report / "figures", "speedup", "MLP block speed-up vs active fraction",
        "Measured speed-ups and the memory bound. A plain MLP that reads all of W_in to know "
        "which units are active cannot beat 2 / (1 + a); only a predictor of the active units "
        "(not built here) could approach 1 / a.",
        speed_figure(block),
    )  # fmt: skip
    note = Text(
        f"Machine: {result['machine']}, {result['threads']} threads, read bandwidth "
        f"{result['bandwidth_GBps']:.1f} GB/s at the start and "
        f"{result['bandwidth_end_GBps']:.1f} GB/s at the end (the faster of a sum and a GEMV "
        f"over 1 GiB; the bound uses the first). Kernel: {result['kernel']}. Model activation: "
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
    return rx.write_document(report, "Sparse MLP inference speed", str(result["run"]), sections)
