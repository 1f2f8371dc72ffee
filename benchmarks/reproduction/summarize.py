"""Summarise ablation arms (run directories) as the Markdown tables of docs/reproduction.md.

    python benchmarks/reproduction/summarize.py LABEL=RUN_DIR [LABEL=RUN_DIR ...]

Per arm: wall time of training (sum of step times, minutes; measured on a machine shared with
other work unless stated), median step time, final validation loss, per-batch use and turned-off
share of layer 0 and of the layer that lost the most, Pearson r of per-token vs per-batch use,
and each finding's verdict by the rules of docs/verdicts.md (H holds, - does not hold,
? inconclusive, n n/a).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from sparsetrace.claims import FAILS, HOLDS, INCONCLUSIVE
from sparsetrace.report.findings import FINDINGS, evaluate
from sparsetrace.report.rundata import prepare
from sparsetrace.rundir import load_run

MARK = {HOLDS: "H", FAILS: "-", INCONCLUSIVE: "?"}


def row(label: str, path: Path) -> str:
    run = load_run(path)
    rd = prepare(run, label)
    layers, train = rd.layers, run.train
    verdicts = evaluate(rd)
    marks = "".join(MARK.get(verdicts[f.key].outcome, "n") for f in FINDINGS)
    held = sum(verdicts[f.key].outcome == HOLDS for f in FINDINGS)
    worst = int(layers["turned_off"].idxmax())
    r = np.corrcoef(layers["per_token"], layers["per_batch"])[0, 1]
    cells = [
        label, f"{train['step_time_s'].sum() / 60:.1f}", f"{train['step_time_s'].median():.2f}",
        f"{run.eval['val_loss'].iloc[-1]:.2f}",
        f"{layers.loc[0, 'per_batch']:.1f} / {layers.loc[0, 'turned_off']:.1f}",
        f"L{worst}: {layers.loc[worst, 'per_batch']:.1f} / {layers.loc[worst, 'turned_off']:.1f}",
        f"{layers.loc[0, 'on_first_batch']:.1f} → {layers['on_first_batch'].iloc[-1]:.1f}",
        f"{r:+.2f}", f"{held} `{marks}`",
    ]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    print("| arm | train min | s/step | val loss | L0 batch / off % | most off: batch / off % "
          "| first batch L0 → last % | r(tok, batch) | holds `F1..F11` |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for arg in sys.argv[1:]:
        label, _, path = arg.partition("=")
        print(row(label, Path(path)))


if __name__ == "__main__":
    main()
