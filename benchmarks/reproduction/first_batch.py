"""Which convention makes MLP inputs correlated at initialisation? (issue 12, docs/reproduction.md)

For each model convention, build the `cpu` preset's model at initialisation (no training), run
the first training batch (16 x 128 tokens of the embedded corpus) and print each layer's per-batch
use: the share of hidden units that at least one token of the batch uses. The paper's Table 2
("on at batch 0"): 97.0 / 93.2 / 90.9 / 89.0 / 88.2 / 87.5 %. Mean over seeds.

    python benchmarks/reproduction/first_batch.py [--seeds 3] [NAME ...]
"""

from __future__ import annotations

import argparse

import torch

from sparsetrace.config import load_config
from sparsetrace.data import prepare_data
from sparsetrace.metrics import use_stats_from_counts
from sparsetrace.model.transformer import Transformer
from sparsetrace.train.loop import train_batch

T5 = ["--model.style", "t5"]
SIN = ["--model.pos", "sinusoidal"]
CONVENTIONS = {
    "gpt2 (default)": [],
    "t5 (rmsnorm, no bias, relative)": T5,
    "gpt2 + embeddings std 1": ["--model.emb_init_std", "1.0"],
    "t5 + embeddings std 1": [*T5, "--model.emb_init_std", "1.0"],
    "gpt2 + sinusoidal": SIN,
    "gpt2 + sinusoidal + rmsnorm": [*SIN, "--model.norm", "rmsnorm"],
    "gpt2 + sinusoidal + no bias": [*SIN, "--model.bias", "false"],
    "t5 + sinusoidal": [*T5, *SIN],
    "t5 + sinusoidal + embeddings std 1/sqrt(d)": [*T5, *SIN, "--model.emb_init_std", "0.0884"],
    "t5 + sinusoidal + embeddings std 1": [*T5, *SIN, "--model.emb_init_std", "1.0"],
    "t5 + sinusoidal + layernorm": [*T5, *SIN, "--model.norm", "layernorm"],
    "t5 + sinusoidal + d_ff 8192": [*T5, *SIN, "--model.d_ff", "8192"],
    "t5 + sinusoidal + seq 512 (batch 16)": [*T5, *SIN, "--data.seq_len", "512"],
    "t5 + learned positions": [*T5, "--model.pos", "learned"],
}


def first_batch_use(overrides: list[str], seeds: int) -> list[float]:
    """Per layer: % of units used by the first training batch, mean over seeds."""
    cfg = load_config("cpu", overrides)
    data = prepare_data(cfg.data)
    cfg.model = cfg.model.with_data(data.vocab_size, cfg.data.seq_len)
    x, _ = train_batch(cfg, data, 0)
    per_seed = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        with torch.no_grad():
            counts = Transformer(cfg.model)(x, measure=True).use_counts
        per_seed.append(
            [100 * float(use_stats_from_counts(c, cfg.data.seq_len, []).per_batch_frac)
             for c in counts.values()]
        )  # fmt: skip
    return [sum(v) / seeds for v in zip(*per_seed, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="conventions to run (default: all)")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    print(f"per-batch use at the first batch (%), mean of {args.seeds} seeds; paper: "
          "97.0 93.2 90.9 89.0 88.2 87.5")  # fmt: skip
    for name in args.names or CONVENTIONS:
        use = first_batch_use(CONVENTIONS[name], args.seeds)
        print(f"{name:46s}" + "".join(f"{v:7.1f}" for v in use), flush=True)


if __name__ == "__main__":
    main()
