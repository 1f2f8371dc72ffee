"""A dense projection on the same compiled, threaded loop as the sparse paths.

The speed-ups of the sparse paths are meant to measure what sparsity saves, not what a better
matrix-vector kernel does. torch's GEMV reads the MLP's matrices well below the measured read
bandwidth on some hosts (about half of it on a 2-core AMD EPYC), while the numba loops the sparse
paths use read near it; this module runs the dense product on those loops
(:func:`sparsetrace.speed.kernels.rows_dot`), so that each sparse path is
also compared with the faster of the two dense kernels. More than ``max_rows`` tokens in one
call take torch's product (prefill).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsetrace.sites import down_weight
from sparsetrace.speed.sparse_down import MAX_ROWS, NumpyViews


class DenseGemv(NumpyViews):
    """``x W^T + b`` with ``weight`` (out, in) as in ``nn.Linear``, float32."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None, max_rows: int = MAX_ROWS):
        super().__init__()
        weight = weight.detach().float().contiguous()  # no copy when it already is
        self.out_features, self.in_features = weight.shape
        self.max_rows = max_rows
        self.register_buffer("weight", weight)
        zeros = torch.zeros(self.out_features)
        self.register_buffer("bias", zeros if bias is None else bias.detach().float())

    def viewed(self) -> dict[str, Tensor]:
        return {"weight": self.weight, "bias": self.bias}

    @classmethod
    def from_module(cls, module: nn.Module, max_rows: int = MAX_ROWS) -> DenseGemv:
        """From an ``nn.Linear`` or a GPT-2 ``Conv1D`` (weight stored (in, out))."""
        return cls(down_weight(module), getattr(module, "bias", None), max_rows)

    def forward(self, x: Tensor) -> Tensor:
        from sparsetrace.speed.kernels import rows_dot

        shape = x.shape
        rows = x.detach().reshape(-1, self.in_features).float().contiguous()
        if rows.shape[0] > self.max_rows:
            out = F.linear(rows, self.weight, self.bias)
        else:
            views = self.views()
            out = torch.empty(rows.shape[0], self.out_features)
            rows_dot(views["weight"], views["bias"], rows.numpy(), out.numpy())
        return out.reshape(*shape[:-1], self.out_features).to(x.dtype)
