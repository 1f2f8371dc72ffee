"""How much does PPL-p% sparsity move with the evaluation tokens? Disjoint token sets vs the SE.

The activation ratio's bootstrap SE (over sequences) holds the thresholds fixed, but the CETT c
is itself searched on the same tokens (the PPL ratio it must reach is measured on them). Here
the whole measurement — search and ratio — is repeated on ``--sets`` disjoint sets of
``--tokens`` evaluation tokens of a model's final checkpoint (a run's validation split, or a
Hugging Face model on ``--data``; ``over_training.replicate_final``, the same as ``sparsetrace
sparsing-law MODEL --replicates K``); the spread of the ratios across
sets is the total sampling uncertainty at that token count, printed beside the mean bootstrap SEs:
at fixed c, and with the search redone on every resample (``sparsing.uncertainty``), which is
meant to estimate that spread from one set.

    .venv/bin/python benchmarks/sparsing_token_spread.py MODEL [--tokens 4096] [--sets 6] [--p 1]
        [--data embedded] [--seq-len 0]
"""

from __future__ import annotations

import argparse
import statistics
import time

from sparsetrace.sparsing.over_training import replicate_final
from sparsetrace.sparsing.source import ModelOptions, open_source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a run, Hugging Face model directory or series, hub id")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--sets", type=int, default=6)
    parser.add_argument("--p", type=float, default=1.0)
    parser.add_argument("--data", default="embedded", help="a Hugging Face model's text")
    parser.add_argument("--seq-len", type=int, default=0, help="a Hugging Face model's window")
    args = parser.parse_args()
    options = ModelOptions(data=args.data, seq_len=args.seq_len)
    src = open_source(args.model, options, options.stream_tokens(args.tokens, 1 + args.sets))
    final = src.revisions[-1]
    start = time.perf_counter()
    rep = replicate_final(src, final, args.p, args.tokens, args.sets)
    seconds = time.perf_counter() - start
    print(f"{args.model} at {final.label}: PPL-{args.p:g}% on {args.sets} disjoint sets of "
          f"{rep['tokens_per_set']:,} validation tokens (sets 1..{args.sets}; "
          f"{seconds:.0f} s)")  # fmt: skip
    print(f"{'set':>4} {'c':>10} {'PPL ratio':>10} {'activation':>11} {'SE fixed c':>11} "
          f"{'SE search':>10}")  # fmt: skip
    for r in rep["sets"]:
        print(f"{r['token_set']:>4} {r['cett']:>10.5f} {r['ppl_ratio']:>10.5f} "
              f"{r['activation_ratio']:>11.4f} {r['activation_ratio_se']:>11.4f} "
              f"{r['activation_ratio_se_search']:>10.4f}")  # fmt: skip
    mean, sd = rep["mean"], rep["sd"]
    se = statistics.mean(r["activation_ratio_se"] for r in rep["sets"])
    se_search = statistics.mean(r["activation_ratio_se_search"] for r in rep["sets"])
    print(f"mean {mean:.4f}; SD across sets {sd:.4f} ({sd / mean:.1%} relative); mean bootstrap "
          f"SE at fixed c {se:.4f} ({se / mean:.1%}): SD / SE = {sd / se:.1f}; with the search "
          f"{se_search:.4f} ({se_search / mean:.1%}): SD / SE = {sd / se_search:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
