"""Step time of native vs portable CPU arithmetic (`train.arithmetic`) for the `cpu` preset model.

The arithmetic is chosen once per process, so each measurement is a child process: one optimizer
step as in the trainer (forward, backward, AdamW) on random tokens, median over steps after a
warm-up step. Children run in the order native, portable, portable, native (drift on a shared
host cancels); the ratio is portable over native, both medians over the two children.

    python benchmarks/arithmetic_bench.py [--steps 5] [--preset cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

ORDER = ("native", "portable", "portable", "native")


def child(preset: str, arithmetic: str, steps: int) -> None:
    import torch

    from sparsetrace.config import load_config
    from sparsetrace.device import mkl_branch, use_arithmetic
    from sparsetrace.model.transformer import Transformer
    from sparsetrace.train.loop import build_optimizer

    cfg = load_config(preset)
    use_arithmetic(arithmetic, cfg.train.threads, torch.device("cpu"))
    torch.manual_seed(0)
    model = Transformer(cfg.model.with_data(cfg.data.vocab_size, cfg.data.seq_len))
    opt = build_optimizer(model, cfg)
    tokens = torch.randint(0, cfg.data.vocab_size, (cfg.train.batch_size, cfg.data.seq_len + 1))
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        model(tokens[:, :-1], tokens[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i > 0:  # the first step is a warm-up
            times.append(time.perf_counter() - start)
    print(json.dumps({"median_s": statistics.median(times), "threads": torch.get_num_threads(),
                      "kernels": torch.backends.cpu.get_cpu_capability(),
                      "mkl_cbwr": mkl_branch()}))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--child", choices=("native", "portable"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.preset, args.child, args.steps)
        return
    medians: dict[str, list[float]] = {"native": [], "portable": []}
    for arithmetic in ORDER:
        out = subprocess.run(
            [sys.executable, __file__, "--child", arithmetic, "--preset", args.preset,
             "--steps", str(args.steps)], capture_output=True, text=True, check=True,
        )  # fmt: skip
        result = json.loads(out.stdout.strip().splitlines()[-1])
        medians[arithmetic].append(result["median_s"])
        print(f"{arithmetic:9s} {result['median_s']:.3f} s/step  kernels {result['kernels']}, "
              f"MKL branch {result['mkl_cbwr']}, {result['threads']} threads")  # fmt: skip
    native, portable = (statistics.median(medians[k]) for k in ("native", "portable"))
    print(f"\n{args.preset} preset, one optimizer step: native {native:.3f} s, portable "
          f"{portable:.3f} s, portable / native = {portable / native:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
