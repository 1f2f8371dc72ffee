"""Run under torchrun by tests/test_distributed.py: one training step of a model wrapped by
``parallelize.wrap_model`` (DDP or FSDP2), the trainer's teardown, then ``parallelize.leave``.

An object that lives until the interpreter finalizes writes ``MARKER.rank`` from its ``__del__``:
the file exists exactly when the process finalized (ran Python after ``leave``).

    torchrun --standalone --nproc_per_node=2 tests/leave_check.py {ddp,fsdp} MARKER
"""

from __future__ import annotations

import sys

import torch

from sparsetrace.train import parallelize


class Blocks(torch.nn.Module):
    """The shape ``wrap_model`` expects: ``blocks``, each sharded on its own under FSDP."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class MarkAtFinalization:
    def __init__(self, path: str) -> None:
        self.path = path

    def __del__(self, open=open) -> None:  # ``open`` bound now: builtins may be gone by then
        with open(self.path, "w") as f:
            f.write("finalized\n")


def main() -> int:
    strategy, marker = sys.argv[1], sys.argv[2]
    info, device = parallelize.init_distributed(torch.device("cpu"))
    wrapped = parallelize.wrap_model(Blocks(), info, device, strategy)
    wrapped(torch.randn(4, 8)).sum().backward()
    parallelize.barrier(info)
    del wrapped  # the trainer frees any DDP wrapper before the group goes (parallelize.shutdown)
    parallelize.shutdown(info)
    print(f"rank {info.rank}: gloo workers after shutdown: {parallelize.gloo_workers()}")
    globals()["keeper"] = MarkAtFinalization(f"{marker}.{info.rank}")
    return 0


if __name__ == "__main__":
    raise SystemExit(parallelize.leave(main()))
