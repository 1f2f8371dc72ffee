"""Reproduce PyTorch's gloo teardown deadlock, and show the order that avoids it.

    torchrun --standalone --nproc_per_node=2 scripts/gloo_teardown.py model-last 300
    torchrun --standalone --nproc_per_node=2 scripts/gloo_teardown.py model-first 300

Each round: a new gloo group, two DDP steps on it, a barrier, the group destroyed, the model
freed. ``model-last`` frees the DDP model after the group is destroyed, so its C++ Reducer is the
group's last owner: freeing it joins gloo's worker threads with the GIL held, while a worker still
destroying the last collective's work (whose thread-local state holds the Python context that
``backward`` stashes) waits for the GIL -- a deadlock (pytorch#56297). ``model-first`` frees the
model before the barrier, so the group dies with its last Python reference (``del group``), whose
holder releases the GIL before the C++ destructor runs.
A round that does not finish within --timeout seconds prints every thread's stack and exits 1.
Why it matters: sparsetrace's trainer and tests/recorder_loop.py end this way (a CI run hung).
"""

from __future__ import annotations

import argparse
import faulthandler
import time

import torch
import torch.distributed as dist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("order", choices=["model-last", "model-first"])
    parser.add_argument("rounds", type=int)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, start = dist.get_rank(), time.time()
    for i in range(args.rounds):
        faulthandler.dump_traceback_later(args.timeout, exit=True)
        group = dist.new_group(backend="gloo")
        layer = torch.nn.Linear(8, 8)
        model = torch.nn.parallel.DistributedDataParallel(layer, process_group=group)
        for _ in range(2):
            model(torch.randn(4, 8)).sum().backward()
        if args.order == "model-first":
            del model
        dist.barrier(group=group)
        dist.destroy_process_group(group)
        del group
        if args.order == "model-last":
            del model  # the Reducer is the group's last owner here
        if rank == 0:
            print(f"round {i + 1} of {args.rounds} done", flush=True)
    faulthandler.cancel_dump_traceback_later()
    if rank == 0:
        print(f"{args.order}: {args.rounds} rounds in {time.time() - start:.1f} s, no hang")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
