"""Show the gloo abort at interpreter exit that ``parallelize.leave`` avoids.

    torchrun --standalone --nproc_per_node=2 scripts/gloo_exit_abort.py

Rank 0 starts an all-reduce and drops its handle, so a gloo worker thread holds the last reference
to the Python tensor. Rank 1 joins the collective only once rank 0's interpreter is finalizing
(an object freed while finalization clears ``__main__`` creates a file, then sleeps with the GIL
released). Rank 0's worker then frees the tensor, which needs the GIL; asked for during
finalization, the GIL ends the thread with ``pthread_exit``, whose unwinding through a ``noexcept``
destructor calls ``std::terminate``: "terminate called without an active exception", SIGABRT
(gdb: ``ProcessGroupGloo::runLoop`` -> ``~AsyncAllreduceWork`` -> ``TensorImpl::decref_pyobject``
-> ``take_gil`` -> ``PyThread_exit_thread``). Most runs abort; a run that does not (rank 1 was
late, or the tensor's Python object was already gone) exits 0.
"""

from __future__ import annotations

import os
import tempfile
import time

import torch
import torch.distributed as dist


class SleepAtFinalization:
    def __init__(self, flag: str) -> None:
        self.flag = flag

    def __del__(self, open=open, sleep=time.sleep) -> None:  # bound now: modules go at exit
        open(self.flag, "w").close()
        sleep(2.0)


def main() -> None:
    dist.init_process_group("gloo")
    run_id = os.environ["TORCHELASTIC_RUN_ID"]
    flag = os.path.join(tempfile.gettempdir(), f"gloo_exit_abort.{run_id}")
    if dist.get_rank() == 1:
        deadline = time.time() + 30
        while not os.path.exists(flag) and time.time() < deadline:
            time.sleep(0.01)
        os.remove(flag)
    dist.all_reduce(torch.ones(1000), async_op=True)  # the handle is dropped: the worker owns it
    if dist.get_rank() == 0:
        globals()["keeper"] = SleepAtFinalization(flag)


if __name__ == "__main__":
    main()
