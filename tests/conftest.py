"""Shared by every test module: the CPU kernels pinned as the command line pins them.

Before any tensor operation of the test process (ATen picks its kernels once): tests that run
``main()`` in-process and tests that run ``torchrun`` subprocesses then compute alike, and alike
on every x86 host.
"""

import torch

from sparsetrace.train.device import pin_cpu_kernels

pin_cpu_kernels()
assert not torch.cpu._is_avx2_supported() or torch.backends.cpu.get_cpu_capability() == "AVX2", (
    "a tensor operation ran before tests/conftest.py pinned the CPU kernels"
)
