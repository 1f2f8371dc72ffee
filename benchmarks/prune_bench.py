"""Training step time of the dense, the dead-masked and the physically pruned model.

The masking experiment (paper 4.1.1) keeps the masked units in the model: a dead-masked step
costs what a dense one does (plus the mask multiply). Pruning (``sparsetrace prune``) removes
them, so an MLP with a fraction ``keep`` of its units left does ``keep`` of the MLP work. This
measures one optimizer step (forward, backward, gradient clipping, AdamW, as in the trainer) on
random tokens at a preset's shape, for:
- dense:  every unit;
- masked: every unit, a fixed 0/1 mask with ``keep`` ones per layer (the dead-mask arm);
- pruned: ``keep`` of the units per layer (the pruned arm),
alternating the variants step by step over rounds, median per variant, and compares the measured
pruned/dense time ratio with the ideal ratio of training FLOPs per token (analytic below).

    python benchmarks/prune_bench.py [--preset cpu] [--keep 0.7 | --widths 1400,1500,...]
                                     [--steps 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from sparsetrace.config import RunConfig, load_config
from sparsetrace.model.transformer import GATED, ModelConfig, Transformer
from sparsetrace.train.loop import build_optimizer


def flops_per_token(m: ModelConfig, widths: list[int]) -> dict[str, float]:
    """Training FLOPs per token (3x the forward's matmul FLOPs: forward, and backward's two
    products), split into MLP and the rest. Attention scores and values use the mean causal
    context (seq_len + 1) / 2; norms, softmax, embeddings lookups and the optimizer are left out
    (small at these shapes)."""
    d, t = m.d_model, m.seq_len
    w_in = 2 if m.activation in GATED else 1
    mlp = sum(2 * d * f * w_in + 2 * f * d for f in widths)
    attn = m.n_layers * (2 * d * 3 * d + 2 * d * d + 2 * 2 * d * (t + 1) / 2)
    head = 2 * d * m.vocab_size
    return {"mlp": 3.0 * mlp, "total": 3.0 * (mlp + attn + head)}


def make_step(cfg: RunConfig, model: Transformer, batch: torch.Tensor):
    optimizer = build_optimizer(model, cfg)
    x, y = batch[:, :-1], batch[:, 1:]

    def step() -> None:
        loss = model(x, y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss.detach())  # the trainer's one host sync per step

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--keep", type=float, default=0.7, help="kept share of every layer's units")
    ap.add_argument("--widths", default="", help="kept units per layer, e.g. from prune.json")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant and round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before each timing")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    cfg = load_config(args.preset)
    model_cfg = cfg.model.with_data(cfg.data.vocab_size, cfg.data.seq_len)
    dense_w = model_cfg.widths
    kept = ([int(w) for w in args.widths.split(",")] if args.widths
            else [max(1, round(args.keep * w)) for w in dense_w])  # fmt: skip
    torch.manual_seed(0)
    batch = torch.randint(0, model_cfg.vocab_size, (cfg.train.batch_size, cfg.data.seq_len + 1))
    models = {"dense": Transformer(model_cfg), "masked": Transformer(model_cfg),
              "pruned": Transformer(replace(model_cfg, d_ff_per_layer=kept))}  # fmt: skip
    for mlp, k in zip(models["masked"].mlps().values(), kept, strict=True):
        mask = torch.zeros(mlp.unit_mask.numel())
        mask[torch.randperm(mask.numel())[:k]] = 1.0
        mlp.set_unit_mask(mask)
    steps = {name: make_step(cfg, m, batch) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for step in steps.values():
            for _ in range(args.warmup):
                step()
        for _ in range(args.steps):  # variants alternate step by step: load drifts hit all alike
            for name, step in steps.items():
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    dense_f, pruned_f = flops_per_token(model_cfg, dense_w), flops_per_token(model_cfg, kept)
    print(f"preset {args.preset}: {model_cfg.n_layers} layers, d_model {model_cfg.d_model}, "
          f"d_ff {dense_w[0]}, vocab {model_cfg.vocab_size}, batch {cfg.train.batch_size} x "
          f"{cfg.data.seq_len}, {torch.get_num_threads()} threads, "
          f"{args.rounds} x {args.steps} timed steps per variant")  # fmt: skip
    print(f"kept units per layer: {kept} ({100 * sum(kept) / sum(dense_w):.1f} %)")
    for name, t in median.items():
        print(f"{name:>7}: median step {1000 * t:7.1f} ms  ({t / median['dense']:.3f} x dense)")
    print(f"ideal (FLOPs per token) pruned/dense: MLP {pruned_f['mlp'] / dense_f['mlp']:.3f}, "
          f"total {pruned_f['total'] / dense_f['total']:.3f}; MLP share of dense FLOPs "
          f"{dense_f['mlp'] / dense_f['total']:.3f}")  # fmt: skip
    ratio, ideal = median["pruned"] / median["dense"], pruned_f["total"] / dense_f["total"]
    print(f"measured pruned/dense {ratio:.3f} vs ideal {ideal:.3f}: the step time saved is "
          f"{(1 - ratio) / (1 - ideal):.0%} of the FLOPs saved")  # fmt: skip


if __name__ == "__main__":
    main()
