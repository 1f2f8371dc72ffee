"""Where and in which precision a model runs: the device and the autocast dtype.

One home for both, so that training, analysis, pruning and the Sparsing Law measurement agree
(and none of them needs to import the training loop for it).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from sparsetrace.errors import UserError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(
            f"train.device: unknown device {name!r} (auto, cpu, cuda, cuda:N)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is cuda but no CUDA GPU is available")
    return device


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: fp32). auto = bf16 on CUDA and on CPUs with native bf16 units."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    return torch.bfloat16 if native else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
