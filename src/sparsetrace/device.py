"""Where and in which precision a model runs: the device and the autocast dtype.

One home for both, so that training, analysis, pruning and the Sparsing Law measurement agree
(and none of them needs to import the training loop for it).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

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
