"""Where and in which precision a model runs: the device and the autocast dtype.

One home for both, so that training, analysis, pruning and the Sparsing Law measurement agree
(and none of them needs to import the training loop for it).
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from sparsetrace.errors import UserError


def resolve_device(name: str, option: str = "train.device") -> torch.device:
    """The device ``name`` names (auto: CUDA when available); ``option`` is how the user set it,
    for the error message."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{option}: unknown device {name!r} (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{option} is cuda but no CUDA GPU is available")
    return device


def evaluation_device(train_device: str) -> torch.device:
    """Where a trained run is measured: the device it trained on (a run trained on the CPU is
    measured on the CPU on every machine, GPU or not), or the CPU where that device is absent."""
    if train_device == "auto" or train_device.startswith("cuda"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: fp32). auto = bf16 on a CUDA GPU that supports it, else fp32.

    The CPU stays in fp32 under auto even where it has bf16 units (AMX): the same config must
    compute the same thing on every CPU host, and bf16 on a CPU without those units is tens of
    times slower. Ask for ``bf16`` to use them.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def configure_backends(device: torch.device, tf32: bool) -> None:
    """Process-wide matmul settings for a run on ``device``: TF32 on CUDA when asked for (through
    ``fp32_precision`` where PyTorch has it: it refuses a mix with the older ``allow_tf32``)."""
    if device.type != "cuda":
        return
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = "tf32" if tf32 else "ieee"
    else:
        matmul.allow_tf32 = tf32


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


# MKL's reproducibility (CNR) needs a fixed thread count; two threads are the smallest machines
# this project runs on, so a portable run costs them nothing.
PORTABLE_THREADS = 2
# MKL_CBWR branch numbers (mkl_cbwr_get(MKL_CBWR_BRANCH)) by name.
_MKL_BRANCHES = {0: "off", 1: "off", 2: "AUTO", 3: "COMPATIBLE"}


def use_arithmetic(mode: str, threads: int, device: torch.device, strict: bool = True) -> None:
    """Choose this process's CPU arithmetic; call it before the process's first tensor operation.

    ``native``: PyTorch's widest kernels and MKL's fastest path for this CPU, whose rounding
    differs from one kind of CPU to the next (training grows that into other findings).
    ``portable``: the same bits on every x86-64 CPU with AVX2 by construction: ATen's AVX2
    kernels (``ATEN_CPU_CAPABILITY``), MKL's SSE2 branch ``COMPATIBLE`` (``MKL_CBWR``: the one
    branch Intel makes reproducible on every vendor's CPUs; its others fall back to the host's
    fastest path on AMD) and a fixed thread count. ``threads`` > 0 sets the thread count
    (portable: 0 means ``PORTABLE_THREADS``). A GPU run ignores the mode. With ``strict`` a
    portable mode that cannot take effect (not x86-64 with AVX2 and MKL, or kernels already chosen
    in this process) is a :class:`UserError`; without, a warning on stderr, and the process keeps
    what it had (threads and environment included).
    """
    portable = mode == "portable" and device.type == "cpu"
    if portable:
        problem = _make_portable()
        if problem:
            message = f"train.arithmetic portable {problem}; native computes as this host does"
            if strict:
                raise UserError(message)
            print(f"warning: {message}", file=sys.stderr)
            return
    if threads > 0 or portable:
        torch.set_num_threads(threads or PORTABLE_THREADS)


def _make_portable() -> str | None:
    """Ask ATen and MKL for their portable paths (each reads its variable at its first use);
    what went wrong, or None. On failure the environment is left as it was."""
    if (
        platform.machine().lower() not in ("x86_64", "amd64")
        or not torch.backends.mkl.is_available()
    ):
        return "needs an x86-64 CPU and PyTorch built with MKL"
    wanted = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE"}
    before = {name: os.environ.get(name) for name in wanted}
    os.environ.update(wanted)
    kernels, branch = torch.backends.cpu.get_cpu_capability(), mkl_branch()
    if kernels == "AVX2" and branch == "COMPATIBLE":
        return None
    if kernels == "AVX2" and branch is None:
        print("warning: this PyTorch build does not say which MKL branch runs; portable "
              "arithmetic is asked for but not checked", file=sys.stderr)  # fmt: skip
        return None
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    return (
        f"got PyTorch's {kernels} kernels and MKL branch {branch}: the CPU lacks AVX2, or this "
        "process ran tensor operations before the run chose its arithmetic (start a new "
        "process, or set ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=COMPATIBLE before Python starts)"
    )


def cpu_arithmetic() -> dict[str, str | int | None]:
    """What decides this process's CPU rounding (docs/training.md), as it has it: ATen's kernels
    (AVX2, AVX512...), MKL's reproducibility branch and the thread count."""
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "mkl_cbwr": mkl_branch(),
            "threads": torch.get_num_threads()}  # fmt: skip


def mkl_branch() -> str | None:
    """MKL's reproducibility branch in this process (``off``, ``AUTO``, ``COMPATIBLE``...), None
    where PyTorch has no MKL or does not export its getter. Reading it fixes it for the process."""
    library = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        get = ctypes.CDLL(str(library)).mkl_serv_cbwr_get
    except (OSError, AttributeError):
        return None
    number = get(1)  # MKL_CBWR_BRANCH
    return _MKL_BRANCHES.get(number, f"branch {number}")
