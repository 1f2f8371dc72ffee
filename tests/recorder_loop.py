"""A nanoGPT-style plain loop with a Recorder, run by tests/test_recording.py: alone on a batch
of 4 sequences, or under ``torchrun --nproc_per_node=2`` on 2 x 2 (each rank its half).

Usage: python tests/recorder_loop.py RUN_DIR
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel

from sparsetrace.recording import Recorder

STEPS, EVERY, BATCH, SEQ, VOCAB = 6, 2, 4, 16, 64


def main(run_dir: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_inner=64, vocab_size=VOCAB,
                     n_positions=SEQ, activation_function="relu", resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    model = GPT2LMHeadModel(cfg)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    data = torch.randint(0, VOCAB, (STEPS, BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    share = BATCH // world
    rec = Recorder(model, run_dir, every=EVERY, tensorboard=False)
    for step in range(STEPS):
        batch = data[step, rank * share : (rank + 1) * share]
        with rec.step(step):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()  # DDP averages the ranks' gradients: the whole batch's mean gradient
        opt.step()
        opt.zero_grad()
    rec.close()
    if world > 1:
        # Free DDP's Reducer before the process group: if the Reducer is the group's last owner,
        # freeing it joins gloo's worker threads while holding the GIL, and a worker still
        # finishing the last collective needs the GIL -- a deadlock (pytorch#56297) that hung
        # this script in CI and in 1 of 11 runs on a loaded machine (scripts/gloo_teardown.py).
        del model, opt
        dist.barrier()  # leave together: rank 0 may still be writing when rank 1 tears down
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
