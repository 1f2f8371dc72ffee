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

:class:`SparseMlp` runs a whole ReLU-family MLP (this up projection, the activation and a
:class:`SparseDown`) as one kernel call per layer.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsetrace.speed.sparse_down import MAX_ROWS, NumpyViews, Reads, SparseDown

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


class Computed(NamedTuple):
    """What :meth:`SparseUp.compute` computed, each (n, ...): without a down projection the first
    half's pre-activations (plain up or gate) and the gated up half's (None: plain), 0 where not
    computed; with one, the hidden activation (None unless asked for) and the MLP's output."""

    first: np.ndarray | None
    second: np.ndarray | None
    hidden: np.ndarray | None = None
    out: np.ndarray | None = None


_NONE_2D = np.empty((0, 0), np.float32)  # an absent matrix: the kernel skips its step
_NONE_1D = np.empty(0, np.float32)
_NONE_INT8 = np.empty((0, 0), np.int8)


class SparseUp(NumpyViews):
    """``x W^T + b`` for our MLP's ``w_in`` (``weight`` (out, d_model)), computing the units a
    ReLU-family activation can keep: the gated half by the gate's sign (``gated``), the first
    half by the int8 screen (``screen``), both, or every unit (neither: the first projection of
    a plain MLP read in full on the same kernel, for :class:`SparseMlp`). Counts the float32 and
    int8 bytes it reads."""

    def __init__(
        self, weight: Tensor, bias: Tensor | None = None, gated: bool = False,
        screen: bool = False, margin: float = 1.0, max_rows: int = MAX_ROWS,
    ) -> None:  # fmt: skip
        super().__init__()
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
        """Zero the counts (:class:`Reads`: ``rows`` the first half's float32 rows, plain up or
        gate; ``second_rows`` the gated up half's)."""
        self.reads = Reads()

    @classmethod
    def from_module(cls, module: nn.Linear, **options) -> SparseUp:
        return cls(module.weight, module.bias, **options)

    @property
    def bytes_per_token(self) -> float:
        """Mean bytes read per token on the sparse path so far (nan: none)."""
        reads = self.reads
        if not reads.tokens:
            return float("nan")
        rows = 4 * self.d_model * (reads.rows + reads.second_rows)
        # the int8 copy with each row's scale, slack and bias (float32 each)
        screen = self.d_ff * (self.d_model + 12) * reads.calls if self.screen else 0
        return (rows + screen) / reads.tokens

    @property
    def candidate_fraction(self) -> float:
        """Mean fraction of the first half's rows (plain up, or gate) read in float32 per call
        (1: all; nan: no sparse call yet)."""
        reads = self.reads
        return reads.rows / (reads.calls * self.d_ff) if reads.calls else float("nan")

    @property
    def dense_bytes(self) -> int:
        return self.weight.numel() * 4

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        rows = x.detach().reshape(-1, self.d_model).float().contiguous()
        if rows.shape[0] > self.max_rows:
            self.reads.fallbacks += 1
            out = F.linear(rows, self.weight, self.bias)
        else:
            r = self.compute(rows.numpy())
            out = torch.from_numpy(r.first if r.second is None
                                   else np.concatenate([r.first, r.second], 1))  # fmt: skip
        return out.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def candidates(self, rows: Tensor) -> Tensor:
        """(n, d_ff) bool: the units of ``rows`` (n, d_model) the int8 screen cannot rule out.
        The weights are read when the module is built: change them afterwards and build it anew."""
        import numba

        from sparsetrace.speed.kernels import screen_int8

        a = self.views()
        out = np.empty((rows.shape[0], self.d_ff), dtype=np.bool_)
        screen_int8(a["q"], a["scales"], a["slack"], a["first_b"],
                    rows.float().contiguous().numpy(), np.float32(self.margin), out,
                    numba.get_num_threads())  # fmt: skip
        return torch.from_numpy(out)

    def compute(
        self, x: np.ndarray, down: SparseDown | None = None, square: bool = False,
        hidden: bool = False,
    ) -> Computed:  # fmt: skip
        """The sparse path for ``x`` (n, d_model) float32 on one kernel call
        (:func:`sparsetrace.speed.kernels.mlp_rows`): the pre-activations; with ``down`` (exact,
        numba kernel) instead the whole MLP's output with ReLU (``square``: squared; gated:
        ReLU(gate) times up) and the down bias, and the hidden activation if ``hidden``. Counts
        the rows read, here and in ``down``."""
        import numba

        from sparsetrace.speed.kernels import mlp_rows

        if down is not None and not fusable(self, down):
            raise ValueError("the fused MLP needs an exact SparseDown (tau None) on the numba "
                             "kernel, of the up projection's d_model and d_ff")  # fmt: skip
        n, ff, a = x.shape[0], self.d_ff, self.views()
        first = np.empty((n, ff), np.float32) if down is None else _NONE_2D
        second = np.empty((n, ff), np.float32) if self.gated and down is None else _NONE_2D
        h, out, table, out_b = _NONE_2D, _NONE_2D, _NONE_2D, _NONE_1D
        if down is not None:
            views = down.views()
            table, out_b = views["table"], views.get("bias", _NONE_1D)
            h = np.empty((n, ff), np.float32) if hidden else _NONE_2D
            out = np.empty((n, down.d_model), np.float32)
        q, scales, slack = ((a["q"], a["scales"], a["slack"]) if self.screen
                            else (_NONE_INT8, _NONE_1D, _NONE_1D))  # fmt: skip
        first_rows, second_rows, down_rows = mlp_rows(
            x, a["first_w"], a["first_b"], a["second_w"] if self.gated else _NONE_2D,
            a["second_b"] if self.gated else _NONE_1D, q, scales, slack, np.float32(self.margin),
            table, out_b, square, numba.get_num_threads(), first, second, h, out)  # fmt: skip
        reads = self.reads
        reads.rows += first_rows
        reads.second_rows += second_rows
        reads.calls += 1
        reads.tokens += n
        if down is None:
            return Computed(first, second if self.gated else None)
        reads = down.reads
        reads.rows += down_rows
        reads.calls += 1
        reads.tokens += n
        return Computed(None, None, h if hidden else None, out)


def fusable(up: SparseUp, down: SparseDown) -> bool:
    """Whether ``up`` and ``down`` run as one kernel call: an exact down projection (no CETT
    threshold) on the numba kernel, shapes matching."""
    return (down.tau is None and down.kernel == "numba" and down.blocks == 1
            and (down.d_ff, down.d_model) == (up.d_ff, up.d_model))  # fmt: skip


class SparseMlp(nn.Module):
    """A ReLU-family MLP (ReLU, ReLU squared, ReGLU) on its sparse path: ``up`` (a
    :class:`SparseUp`: gated, screened or read in full), the activation and ``down`` (a
    :class:`SparseDown`). Where they are :func:`fusable` they run as one kernel call per layer,
    one parallel loop in which each thread takes a consecutive chunk of the units from the
    first projection to its share of the second (:func:`sparsetrace.speed.kernels.mlp_rows`):
    no Python, torch or serial step between the projections. Otherwise (a thresholded or
    ``embedding_bag`` down projection), and for more than ``up.max_rows`` tokens, the modules
    run one after the other (with their dense fallbacks). The counts are the two modules'."""

    def __init__(self, up: SparseUp, down: SparseDown, square: bool = False) -> None:
        super().__init__()
        if square and up.gated:
            raise ValueError("square is ReLU squared, a plain MLP's activation; got a gated up")
        if (up.d_ff, up.d_model) != (down.d_ff, down.d_model):
            raise ValueError(f"up ({up.d_model} -> {up.d_ff}) and down ({down.d_ff} -> "
                             f"{down.d_model}) do not make one MLP")  # fmt: skip
        self.up, self.down, self.square = up, down, square
        self.fused = fusable(up, down)

    def hidden_and_output(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(the hidden activation, the MLP's output) for ``x`` (..., d_model)."""
        return self._run(x, hidden=True)

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x, hidden=False)[1]

    def _run(self, x: Tensor, hidden: bool) -> tuple[Tensor | None, Tensor]:
        shape = x.shape
        rows = x.detach().reshape(-1, self.up.d_model)
        if not self.fused or rows.shape[0] > self.up.max_rows:
            pre = self.up(rows)
            if self.up.gated:
                gate, up = pre.chunk(2, dim=-1)
                h = F.relu(gate) * up
            else:
                h = F.relu(pre).square() if self.square else F.relu(pre)
            out = self.down(h)
            return h.reshape(*shape[:-1], -1), out.reshape(shape).to(x.dtype)
        if rows.dtype != torch.float32 or not rows.is_contiguous():
            rows = rows.float().contiguous()
        r = self.up.compute(rows.numpy(), self.down, self.square, hidden)
        h = torch.from_numpy(r.hidden).reshape(*shape[:-1], -1) if hidden else None
        y = torch.from_numpy(r.out).view(shape)
        return h, y if x.dtype == torch.float32 else y.to(x.dtype)

    @classmethod
    def llama(cls, mlp: nn.Module, down: SparseDown, **options) -> SparseMlp:
        """A Llama-family MLP (``down_proj(act_fn(gate_proj x) * up_proj x)``, ReLU
        ``act_fn``): its gate and up projections as one gate-sparse :class:`SparseUp`, its down
        projection the given :class:`SparseDown`."""
        gate, up = mlp.gate_proj, mlp.up_proj
        biases = [torch.zeros(m.out_features) if m.bias is None else m.bias for m in (gate, up)]
        sparse_up = SparseUp(torch.cat([gate.weight, up.weight]), torch.cat(biases), gated=True,
                             **options)  # fmt: skip
        return cls(sparse_up, down)
