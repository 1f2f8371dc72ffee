"""Does bf16 autocast change the sparsity statistics? fp32 vs bf16 forward of one trained model.

Loads a run's final checkpoint and measures, on the same held-out batches, each layer's
per-token / per-sequence / per-batch use and the 50th percentile with the forward pass in fp32 and
under bf16 autocast; prints both and the differences. This isolates the numerical effect of bf16
on which units are nonzero; it does not measure whether *training* in bf16 drifts to different
statistics (that needs two full trainings; on a CPU without native bf16 units bf16 training is
impractically slow, see results/bench-bf16.md).

    python benchmarks/bf16_stats.py RUN_DIR [--batches 4] [--device cuda] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from sparsetrace.checkpoint import load_trained_model
from sparsetrace.data import get_batch, prepare_data
from sparsetrace.device import autocast
from sparsetrace.metrics import use_stats_from_counts


@torch.no_grad()
def layer_stats(model, batches, dtype) -> dict[str, np.ndarray]:
    rows = []
    for batch in batches:
        batch = batch.to(next(model.parameters()).device)
        with autocast(batch.device, dtype):
            counts = model(batch[:, :-1], measure=True).use_counts
        seq = batch.shape[1] - 1
        stats = [use_stats_from_counts(c, seq) for c in counts.values()]
        keys = ("per_token_frac", "per_sequence_frac", "per_batch_frac")
        rows.append(
            [[float(getattr(s, k)) for k in keys] + [float(s.percentiles[50.0])] for s in stats]
        )
    return np.mean(np.array(rows), axis=0)  # (layers, 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args()
    model, cfg = load_trained_model(args.run)
    model.to(args.device)
    data = prepare_data(cfg.data)
    b, seq = cfg.train.batch_size, cfg.data.seq_len
    batches = [get_batch(data.val, np.arange(i * b, (i + 1) * b), seq) for i in range(args.batches)]
    fp32 = layer_stats(model, batches, None)
    bf16 = layer_stats(model, batches, torch.bfloat16)
    names = ["per-token", "per-seq", "per-batch", "p50"]
    print(
        f"run {args.run}, {args.batches} val batches of {b} x {seq}; "
        "values in % (fp32 / bf16 / diff)"
    )
    print("layer  " + "  ".join(f"{n:>26s}" for n in names))
    for layer in range(fp32.shape[0]):
        cells = [f"{100 * fp32[layer, k]:7.2f} {100 * bf16[layer, k]:7.2f} "
                 f"{100 * (bf16[layer, k] - fp32[layer, k]):+7.2f}" for k in range(4)]  # fmt: skip
        print(f"{layer:5d}  " + "  ".join(f"{c:>26s}" for c in cells))
    worst = 100 * np.abs(bf16 - fp32).max()
    print(f"max |diff| (percentage points): {worst:.3f}")
    if args.json:
        args.json.write_text(json.dumps({
            "run": str(args.run), "device": args.device, "batches": args.batches,
            "batch_size": b, "seq_len": seq, "metrics": names,
            "fp32_pct": (100 * fp32).tolist(), "bf16_pct": (100 * bf16).tolist(),
            "max_abs_diff_points": float(worst),
        }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
