"""Run a script under ``torchrun --standalone --nproc_per_node=2`` from a test, on CPU (gloo).

The run gets a session of its own so that a hung run (a worker stuck in a collective or in
teardown) is killed whole -- torchrun and both workers -- and the test fails with the workers'
stderr instead of leaving processes behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest


def torchrun(*args: str, env: dict[str, str] | None = None, timeout: float = 240) -> None:
    """``python -m torch.distributed.run --nproc_per_node=2 --standalone ARGS``; fails the test on a
    non-zero exit or after ``timeout`` seconds, with the tail of stderr."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"torchrun timed out after {timeout:.0f} s: {err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
