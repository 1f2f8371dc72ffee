"""Step time of fp32 vs bf16 autocast on this machine's CPU (or GPU), for the `cpu` preset model.

One optimizer step as in the trainer (forward, backward, AdamW) on random tokens; the two
precisions alternate, median over steps after a warm-up step each. Prints whether the CPU has
native bf16 units (AMX / AVX512-BF16), which is what `train.precision auto` checks.

    python benchmarks/precision_bench.py [--steps 3] [--preset cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sparsetrace.config import load_config
from sparsetrace.model.transformer import Transformer
from sparsetrace.train.loop import autocast, build_optimizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    cfg = load_config(args.preset)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = Transformer(cfg.model.with_data(cfg.data.vocab_size, cfg.data.seq_len)).to(device)
    opt = build_optimizer(model, cfg)
    tokens = torch.randint(0, cfg.data.vocab_size, (cfg.train.batch_size, cfg.data.seq_len + 1))
    tokens = tokens.to(device)
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    for i in range(args.steps + 1):
        for name, dtype in dtypes.items():
            start = time.perf_counter()
            with autocast(device, dtype):
                loss = model(tokens[:, :-1], tokens[:, 1:]).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss.item()
            if i > 0:  # the first step of each precision is a warm-up
                times[name].append(time.perf_counter() - start)
    native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU native bf16 units: {native}")  # fmt: skip
    fp32, bf16 = (statistics.median(times[k]) for k in ("fp32", "bf16"))
    print(
        f"  fp32 {fp32:.3f} s/step   bf16 autocast {bf16:.3f} s/step   "
        f"bf16/fp32 = {bf16 / fp32:.2f}"
    )


if __name__ == "__main__":
    main()
