"""How much does PPL-p% sparsity move with the evaluation tokens? Disjoint token sets vs the SE.

The activation ratio's bootstrap SE (over sequences) holds the thresholds fixed, but the CETT c
is itself searched on the same tokens (the PPL ratio it must reach is measured on them). Here
the whole measurement — search and ratio — is repeated on ``--sets`` disjoint sets of
``--tokens`` validation tokens of one checkpoint; the spread of the ratios across sets is the
total sampling uncertainty at that token count, printed beside the mean bootstrap SE.

    .venv/bin/python benchmarks/sparsing_token_spread.py RUN [--tokens 4096] [--sets 6] [--p 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from sparsetrace.data import prepare_data
from sparsetrace.sparsing.over_training import validation_batches
from sparsetrace.sparsing.search import Subject, find_cett
from sparsetrace.sparsing.truncation import transformer_down_projections, transformer_gates
from sparsetrace.train.checkpoint import list_checkpoints, load_trained_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--sets", type=int, default=6)
    parser.add_argument("--p", type=float, default=1.0)
    args = parser.parse_args()
    ckpt = list_checkpoints(args.run)[-1]
    model, cfg = load_trained_model(args.run, ckpt)
    val, seq = prepare_data(cfg.data).val, cfg.data.seq_len
    windows = -(-args.tokens // seq)
    span = windows * seq + 1  # tokens one set's windows read; the next set starts after them
    available = len(val) // span
    if available < args.sets:
        raise SystemExit(f"validation holds {available} disjoint sets of {args.tokens} tokens")
    print(f"{args.run} at {ckpt.name}: PPL-{args.p:g}% on {args.sets} disjoint sets of "
          f"{windows * seq:,} validation tokens")  # fmt: skip
    print(f"{'set':>4} {'c':>10} {'PPL ratio':>10} {'activation':>11} {'± SE':>8} {'s':>6}")
    ratios, ses = [], []
    for k in range(args.sets):
        start = time.perf_counter()
        batches = validation_batches(val[k * span :], seq, args.tokens)
        subject = Subject(model, transformer_down_projections(model), batches,
                          gates=transformer_gates(model))  # fmt: skip
        search = find_cett([subject], args.p)
        m = subject.measure(search.x)
        ratios.append(m.activation_ratio)
        ses.append(m.activation_ratio_se)
        print(f"{k:>4} {search.x:>10.5f} {m.ppl_ratio:>10.5f} {m.activation_ratio:>11.4f} "
              f"{m.activation_ratio_se:>8.4f} {time.perf_counter() - start:>6.1f}")  # fmt: skip
    mean, sd = statistics.mean(ratios), statistics.stdev(ratios)
    se = statistics.mean(ses)
    print(f"mean {mean:.4f}; SD across sets {sd:.4f} ({sd / mean:.1%} relative); mean bootstrap "
          f"SE at fixed c {se:.4f} ({se / mean:.1%}); SD / SE = {sd / se:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
