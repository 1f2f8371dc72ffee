"""Saved MLP activations, (batch, seq, hidden) per array, for ``sparsetrace metrics``.

Formats: ``.npy`` (one array, named "acts"), ``.npz`` (one array per key) and ``.safetensors``
(one tensor per key). Pickled objects are never loaded. Anything unreadable or of the wrong shape
or type is a :class:`UserError` naming the file and the array.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from sparsetrace.errors import UserError

NPY_KEY = "acts"
# bool counts as 0/1; complex, strings, dates and records are not activations.
_NUMPY_KINDS = "biuf"


def load_activation_file(path: Path) -> dict[str, torch.Tensor]:
    """Arrays of ``path`` by name, each checked to be a non-empty numeric (batch, seq, hidden)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {'not a file' if path.exists() else 'no such file'}")
    loader = _LOADERS.get(path.suffix.lower())
    if loader is None:
        known = ", ".join(_LOADERS)
        raise UserError(f"{path}: unknown extension {path.suffix!r}; expected one of {known}")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: file is empty")
    arrays = loader(path)
    if not arrays:
        raise UserError(f"{path}: contains no arrays")
    return {key: _checked(path, key, value) for key, value in arrays.items()}


def _load_npy(path: Path) -> dict[str, np.ndarray | torch.Tensor]:
    try:
        with path.open("rb") as f:
            return {NPY_KEY: np.lib.format.read_array(f, allow_pickle=False)}
    except Exception as err:  # numpy raises many types for a malformed file
        raise UserError(f"{path}: not a readable .npy file ({_one_line(err)})") from err


def _load_npz(path: Path) -> dict[str, np.ndarray | torch.Tensor]:
    # np.load takes anything that is not a zip or .npy for a pickle: say what is wrong instead.
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path}: not a .npz archive (not a zip file)")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as err:
        raise UserError(f"{path}: not a readable .npz file ({_one_line(err)})") from err
    arrays: dict[str, np.ndarray | torch.Tensor] = {}
    with archive:
        for key in archive.files:
            try:
                value = archive[key]
            except Exception as err:
                raise UserError(f"{path}: array {key!r} cannot be read ({_one_line(err)})") from err
            if not isinstance(value, np.ndarray):  # NpzFile hands back non-.npy members as bytes
                raise UserError(f"{path}: member {key!r} is not a .npy array")
            arrays[key] = value
    return arrays


def _load_safetensors(path: Path) -> dict[str, np.ndarray | torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(path)))
    except Exception as err:  # SafetensorError and friends for a malformed header or body
        raise UserError(f"{path}: not a readable .safetensors file ({_one_line(err)})") from err


_LOADERS: dict[str, Callable[[Path], dict[str, np.ndarray | torch.Tensor]]] = {
    ".npy": _load_npy,
    ".npz": _load_npz,
    ".safetensors": _load_safetensors,
}


def _checked(path: Path, key: str, value: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``value`` as a tensor, after checking dtype, rank and size."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in _NUMPY_KINDS:
            raise UserError(
                f"{path}: array {key!r} has non-numeric dtype {value.dtype}; "
                "expected bool, integer or float"
            )
        if not value.dtype.isnative:  # torch only takes native byte order
            value = value.astype(value.dtype.newbyteorder("="))
        tensor = torch.from_numpy(value)
    else:
        tensor = value
        if tensor.dtype.is_complex:
            raise UserError(
                f"{path}: array {key!r} has dtype {tensor.dtype}; expected bool, integer or float"
            )
    if tensor.dim() != 3:
        raise UserError(
            f"{path}: array {key!r} has shape {tuple(tensor.shape)}; "
            "expected 3 dimensions (batch, seq, hidden)"
        )
    if tensor.numel() == 0:
        raise UserError(f"{path}: array {key!r} is empty (shape {tuple(tensor.shape)})")
    return tensor


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
