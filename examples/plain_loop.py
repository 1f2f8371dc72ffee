"""Trace sparsity over training in a nanoGPT-style loop of your own: sparsetrace.Recorder.

    python examples/plain_loop.py [OUT]          # ~1 minute here; default OUT: runs/example-plain
    sparsetrace report OUT/run                   # Tables 1-3, Figures 1-2 of the paper

The model is sparsetrace's `cpu` preset (6 ReLU layers, d_ff 2048) on the embedded Shakespeare
corpus, trained for 120 steps; any model trace() supports works the same way.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

import sparsetrace
from sparsetrace.config import load_config
from sparsetrace.data import batch_indices, get_batch, prepare_data
from sparsetrace.model.transformer import Transformer
from sparsetrace.report import write_report

STEPS, WARMUP, EVERY, LR = 120, 12, 10, 3e-3


def main(out: Path) -> None:
    cfg = load_config("cpu")
    data = prepare_data(cfg.data)  # tokenized once, then cached under .cache/sparsetrace
    torch.manual_seed(0)
    model = Transformer(cfg.model.with_data(data.vocab_size, data.seq_len))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
    n, batch = data.n_sequences("train"), cfg.train.batch_size
    meta = {"train": {"steps": STEPS, "warmup_steps": WARMUP, "lr": LR, "batch_size": batch}}
    rec = sparsetrace.Recorder(model, out / "run", every=EVERY, meta=meta)
    start = time.perf_counter()
    for step in range(STEPS):
        for group in opt.param_groups:  # linear warm-up, then constant
            group["lr"] = LR * min(1.0, (step + 1) / WARMUP)
        x = get_batch(data.train, batch_indices(n, step, batch, seed=0), data.seq_len)
        with rec.step(step):  # measures this forward pass on step 0 and every EVERY-th
            loss = model(x[:, :-1], x[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 20 == 0:
            rec.log(step, loss=loss.item(), lr=opt.param_groups[0]["lr"])
            print(f"step {step:4d}  loss {loss.item():.3f}  {time.perf_counter() - start:5.1f} s")
    rec.close()
    index = write_report([out / "run"], out / "report")
    print(f"run directory: {out / 'run'}\nreport: {index}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/example-plain"))
