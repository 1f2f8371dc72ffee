"""An up projection that computes only the pre-activations the MLP's ReLU can keep.

A plain MLP's down projection can skip inactive units (:class:`SparseDown`), but its up
projection must be read in full to learn which units are active; that caps a plain MLP at
``2 / (1 + a)``. Two exact ways past it, for our Transformer's ``w_in`` (``[gate | up]`` when
gated):

- **Gated ReLU** (ReGLU: ``relu(x W_gate) * (x W_up)``): the gate is computed densely, then only
  the rows of ``W_up`` of units whose gate is positive (the others are multiplied by zero).
  Bound with :class:`SparseDown` reading the same units of ``W_out``: ``3 / (1 + 2a)``.
- **An int8 screen** (a predictor of the active units that cannot miss one): an int8 copy of the
  first projection (per-row absmax scale) estimates every pre-activation at a quarter of the
  bytes; ``|W_i x - s_i q_i x| <= ||W_i - s_i q_i|| ||x||`` (Cauchy-Schwarz) bounds the estimate's
  error, so a unit whose estimate plus that bound is below zero is inactive for certain (in
  IEEE float32 arithmetic: the slack covers rounding, below), and
  only the remaining candidates' float32 rows are read. Bound: ``2 / (1/4 + c + a)`` for a plain
  MLP with ``c`` the candidate fraction. ``margin`` < 1 shrinks the bound (an inexact predictor,
  off by default): fewer candidates, some active units missed; recall and the perplexity cost
  are the caller's to measure.

Units the path does not compute are returned as 0, which ReLU (and ReLU squared) maps to 0:
exactly the dense result up to float32 summation order. The slack added to each row's bound
covers the float32 rounding of both the int8 estimate and the dense product (``gamma_d``
bounds, padded), so a unit the dense model computes as a tiny positive number is a candidate
too. More than ``max_rows`` tokens in one call take the dense product (prefill).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsetrace.speed.sparse_down import MAX_ROWS, NumpyViews

INT8_MAX = 127


def int8_rows(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row absmax int8 quantisation of ``weight`` (rows, d): (q int8, scales, slack), with
    ``slack[i]`` bounding ``|weight[i] . x - scales[i] * fl(q[i] . x)| / ||x||`` and the float32
    rounding of the dense product ``fl(weight[i] . x)``, for any ``x`` and summation order."""
    w = weight.detach().double()
    scales = w.abs().amax(1) / INT8_MAX
    # the kernel multiplies by float32 scales: the residual is taken with those
    scales = torch.where(scales > 0, scales, torch.ones_like(scales)).float().double()
    q = torch.round(w / scales[:, None]).clamp_(-INT8_MAX, INT8_MAX)
    residual = (w - scales[:, None] * q).norm(dim=1)
    # gamma_n = n u / (1 - n u) bounds a float32 dot product of n terms in any order (the
    # products, the scale multiply and the bias add counted as terms). Doubled, it also pays for
    # what the formula leaves out: ||x|| computed in float32 (low by up to gamma_d, relative), a
    # dense product that adds the bias inside its sum, the kernel's reordering of its last sums.
    gamma = 2.0 * (w.shape[1] + 4) * 2.0**-24
    slack = residual + gamma * (scales * q.norm(dim=1) + w.norm(dim=1))
    return q.to(torch.int8), scales.float(), (slack * (1 + 1e-6)).float()


class SparseUp(NumpyViews):
    """``x W^T + b`` for our MLP's ``w_in`` (``weight`` (out, d_model)), computing the units a
    ReLU-family activation can keep: the gated half by the gate's sign (``gated``), the first
    half by the int8 screen (``screen``), or both. Counts the float32 and int8 bytes it reads."""

    def __init__(
        self, weight: Tensor, bias: Tensor | None = None, gated: bool = False,
        screen: bool = False, margin: float = 1.0, max_rows: int = MAX_ROWS,
    ) -> None:  # fmt: skip
        super().__init__()
        if not (gated or screen):
            raise ValueError("SparseUp needs gated=True or screen=True (else it is dense)")
        if not 0 <= margin <= 1:
            raise ValueError(f"margin must be in [0, 1]; got {margin}")
        weight = weight.detach().float().contiguous()
        self.out_features, self.d_model = weight.shape
        self.d_ff = self.out_features // 2 if gated else self.out_features
        self.gated, self.screen, self.margin, self.max_rows = gated, screen, margin, max_rows
        self.register_buffer("weight", weight)
        zeros = torch.zeros(self.out_features)
        self.register_buffer("bias", zeros if bias is None else bias.detach().float().clone())
        if screen:
            q, scales, slack = int8_rows(weight[: self.d_ff])
            self.register_buffer("q", q)
            self.register_buffer("scales", scales)
            self.register_buffer("slack", slack)
        self.reset_counts()

    def viewed(self) -> dict[str, Tensor]:
        ff = self.d_ff
        views = {"first_w": self.weight[:ff], "first_b": self.bias[:ff],
                 "second_w": self.weight[ff:], "second_b": self.bias[ff:]}  # fmt: skip
        if self.screen:
            views |= {"q": self.q, "scales": self.scales, "slack": self.slack}
        return views

    def reset_counts(self) -> None:
        """Zero the counts: dense fallbacks, sparse calls and tokens, float32 rows read (first
        half: plain up or gate; second: the gated up half)."""
        self.fallbacks = self.calls = self.tokens_seen = 0
        self.first_rows = self.second_rows = 0

    @classmethod
    def from_module(cls, module: nn.Linear, **options) -> SparseUp:
        return cls(module.weight, module.bias, **options)

    @property
    def bytes_per_token(self) -> float:
        """Mean bytes read per token on the sparse path so far (nan: none)."""
        if not self.tokens_seen:
            return float("nan")
        rows = 4 * self.d_model * (self.first_rows + self.second_rows)
        # the int8 copy with each row's scale, slack and bias (float32 each)
        screen = self.d_ff * (self.d_model + 12) * self.calls if self.screen else 0
        return (rows + screen) / self.tokens_seen

    @property
    def candidate_fraction(self) -> float:
        """Mean fraction of the first half's rows (plain up, or gate) read in float32 per call
        (1: all; nan: no sparse call yet)."""
        return self.first_rows / (self.calls * self.d_ff) if self.calls else float("nan")

    @property
    def dense_bytes(self) -> int:
        return self.weight.numel() * 4

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        rows = x.detach().reshape(-1, self.d_model).float().contiguous()
        if rows.shape[0] > self.max_rows:
            self.fallbacks += 1
            out = F.linear(rows, self.weight, self.bias)
        else:
            out = self._sparse(rows)
        return out.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def candidates(self, rows: Tensor) -> Tensor:
        """(n, d_ff) bool: the units of ``rows`` (n, d_model) the int8 screen cannot rule out.
        The weights are read when the module is built: change them afterwards and build it anew."""
        from sparsetrace.speed.kernels import screen_int8

        a = self.views()
        out = np.empty((rows.shape[0], self.d_ff), dtype=np.bool_)
        screen_int8(a["q"], a["scales"], a["slack"], a["first_b"],
                    rows.float().contiguous().numpy(), np.float32(self.margin), out)  # fmt: skip
        return torch.from_numpy(out)

    def _sparse(self, rows: Tensor) -> Tensor:
        from sparsetrace.speed.kernels import rows_dot, scattered_rows_dot, screened_rows_dot

        n, ff, a, x = rows.shape[0], self.d_ff, self.views(), rows.numpy()
        if self.screen:  # units screened out stay 0
            first = np.zeros((n, ff), np.float32)
            read = screened_rows_dot(a["q"], a["scales"], a["slack"], a["first_w"],
                                     a["first_b"], x, np.float32(self.margin), first)  # fmt: skip
        else:  # on the same compiled loop: what the sparse path saves, not a faster GEMV
            first = np.empty((n, ff), np.float32)
            read = rows_dot(a["first_w"], a["first_b"], x, np.ones((n, ff), np.bool_), first)
        self.first_rows += read
        self.calls += 1
        self.tokens_seen += n
        if not self.gated:
            return torch.from_numpy(first)
        second = np.zeros((n, ff), np.float32)
        self.second_rows += scattered_rows_dot(a["second_w"], a["second_b"], x, first > 0, second)
        return torch.from_numpy(np.concatenate([first, second], axis=1))


class SparseGatedMlp(nn.Module):
    """A Llama-family MLP (``down_proj(act_fn(gate_proj x) * up_proj x)``, ReLU ``act_fn``) on
    the sparse path: its gate and up projections as one gate-sparse :class:`SparseUp`, its down
    projection the given :class:`SparseDown`."""

    def __init__(self, mlp: nn.Module, down: nn.Module, **options) -> None:
        super().__init__()
        gate, up = mlp.gate_proj, mlp.up_proj
        biases = [torch.zeros(m.out_features) if m.bias is None else m.bias for m in (gate, up)]
        self.up = SparseUp(torch.cat([gate.weight, up.weight]), torch.cat(biases), gated=True,
                           **options)  # fmt: skip
        self.down = down

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.up(x).chunk(2, dim=-1)
        return self.down(F.relu(gate) * up)
