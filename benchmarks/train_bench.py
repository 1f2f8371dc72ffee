"""Training throughput: sparsetrace's trainer (tracing on / off) against a minimal PyTorch loop.

Measures in one run, interleaving the three variants over several rounds (median per variant):
- plain:     the same model and batches in a bare loop (forward, backward, clip, AdamW step);
- untraced:  ``sparsetrace.train.loop.train`` with ``trace.every 0``;
- traced:    the same with the preset's ``trace.every`` (default 25).
Reports traced/untraced (tracing overhead; target <= 1.02), untraced/plain (trainer overhead;
target <= 1.05) end to end and per step (median step time; the trainer's own step_time_s log vs
the plain loop's), and from the traced run's own log the median time of a traced step vs an
untraced step. Timing excludes data preparation (cached) and process start; the trainer
variants include everything else they do (logging, the final evaluation and checkpoint).

    python benchmarks/train_bench.py [--preset cpu] [--steps 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sparsetrace.config import RunConfig, load_config
from sparsetrace.data import batch_indices, get_batch, prepare_data
from sparsetrace.model.transformer import Transformer
from sparsetrace.rundir import load_run
from sparsetrace.train.loop import lr_at, train


def plain_loop(cfg: RunConfig) -> tuple[float, list[float]]:
    """The reference: what a researcher would write by hand for the same model and data."""
    data = prepare_data(cfg.data)
    t = cfg.train
    n = data.n_sequences("train")
    batches = [
        get_batch(data.train, batch_indices(n, s, t.batch_size, t.seed), cfg.data.seq_len)
        for s in range(t.steps)
    ]
    torch.manual_seed(t.seed)
    model = Transformer(cfg.model.with_data(data.vocab_size, cfg.data.seq_len))
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2),
                            weight_decay=t.weight_decay)  # fmt: skip
    start = time.perf_counter()
    step_times = []
    for step, batch in enumerate(batches):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = model(batch[:, :-1], batch[:, 1:]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        step_times.append(time.perf_counter() - t0)
    return time.perf_counter() - start, step_times[1:]  # step 0 carries one-off warm-up costs


def trainer(cfg: RunConfig, out: Path) -> tuple[float, Path]:
    start = time.perf_counter()
    run_dir = train(cfg, command="benchmark")
    return time.perf_counter() - start, run_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="train_bench_"))
    base = ["--train.steps", str(args.steps), "--eval.every", str(10**9), "--eval.batches", "1",
            "--checkpoint.every", str(10**9), "--checkpoint.keep", "1",
            "--out_dir", str(out)]  # fmt: skip
    every = load_config(args.preset).trace.every
    times: dict[str, list[float]] = {"plain": [], "untraced": [], "traced": []}
    traced_steps: list[float] = []
    untraced_steps: list[float] = []
    plain_steps: list[float] = []
    trainer_steps: list[float] = []
    prepare_data(load_config(args.preset).data)  # build the token cache outside the timings
    for r in range(args.rounds):
        seconds, steps = plain_loop(load_config(args.preset, base))
        times["plain"].append(seconds)
        plain_steps += steps
        for name, trace_every in (("untraced", 0), ("traced", every)):
            cfg = load_config(
                args.preset, [*base, "--trace.every", str(trace_every), "--run_name", f"{name}{r}"]
            )
            seconds, run_dir = trainer(cfg, out)
            times[name].append(seconds)
            if name == "untraced":
                trainer_steps += list(load_run(run_dir).train.step_time_s[1:])
            if name == "traced":
                log = load_run(run_dir).train
                measured = set(load_run(run_dir).sparsity.step)
                steps = log[log.step > 0]  # step 0 carries one-off warm-up costs
                traced_steps += list(steps[steps.step.isin(measured)].step_time_s)
                untraced_steps += list(steps[~steps.step.isin(measured)].step_time_s)
    shutil.rmtree(out, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"preset {args.preset}, {args.steps} steps x {args.rounds} rounds, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"trace.every {every}")  # fmt: skip
    for k, v in med.items():
        print(
            f"  {k:9s} {v:8.2f} s  ({v / args.steps * 1000:7.1f} ms/step)  runs: "
            + ", ".join(f"{x:.2f}" for x in times[k])
        )
    print(
        f"  tracing overhead   traced/untraced = {med['traced'] / med['untraced']:.4f}"
        "  (target <= 1.02)"
    )
    print(
        f"  trainer overhead   untraced/plain  = {med['untraced'] / med['plain']:.4f}"
        "  end to end, incl. the trainer's fixed costs (setup, final eval and checkpoint)"
    )
    per_step = statistics.median(trainer_steps) / statistics.median(plain_steps)
    print(
        f"  trainer overhead per step (median step, untraced / plain) = {per_step:.4f}"
        "  (target <= 1.05)"
    )
    ts, us = statistics.median(traced_steps), statistics.median(untraced_steps)
    print(
        f"  one traced step {ts * 1000:.1f} ms vs untraced step {us * 1000:.1f} ms "
        f"(ratio {ts / us:.3f}, medians over {len(traced_steps)} / {len(untraced_steps)} steps)"
    )


if __name__ == "__main__":
    main()
