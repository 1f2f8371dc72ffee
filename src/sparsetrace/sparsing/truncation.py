"""Applying truncation rules to a model: forward pre-hooks on its MLP down projections.

Generic over the hook sites :func:`sparsetrace.sites.mlp_sites` finds (ours, GPT-2, OPT,
GPT-NeoX, the Llama family, or modules named by hand): the hidden activation is the input of the
down projection for plain and gated MLPs alike, and the down projection's weight, read through
:func:`~sparsetrace.sites.down_weight` whatever its layout, gives the units' column norms.

Some rules decide on the *gate* of a gated MLP, ``act(W_gate x)``, rather than on the product
``act(W_gate x) * (W_up x)`` the down projection sees (the Sparsing Law's Top-k and FAT-ε baselines
in the public code act on ``act(gate)``). The sites' gate taps capture it from the module producing
it; for a plain MLP (or a gated one whose gate cannot be read) the gate is the hidden activation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from sparsetrace.sites import HookContext, MlpSites, down_weight
from sparsetrace.sparsing.cett import DEAD_FRACTION, is_dead, kept, unit_norms

Observer = Callable[[str, Tensor, Tensor], None]  # (layer name, valid hidden rows, W_out) -> None


class TruncationRule(Protocol):
    """A truncation rule: which entries of a hidden activation (..., d_ff) to keep, given the
    down projection's weight and the layer's gate activation (``h`` itself for a plain MLP)."""

    def keep(self, h: Tensor, w_out: Tensor, gate: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class Threshold:
    """CETT-style truncation: zero entries with ``|a| * ||W_out[:, i]|| < tau``.

    Sparsing Law, "PPL-p% sparsity": at inference the rule prunes ``|a| < tau / ||W_out[:, i]||``;
    the hook evaluates it in the n-form so that it agrees bit for bit with the metrics.
    """

    tau: float

    def keep(self, h: Tensor, w_out: Tensor, gate: Tensor) -> Tensor:
        return kept(unit_norms(h, w_out), self.tau)


class Truncation(HookContext):
    """Context manager: hooks on each down projection that apply ``rules`` (none: dense) and count,
    per unit, the valid tokens on which it is active (nonzero after truncation).

    Set ``shape`` to the batch's (batch, seq) before a forward (layers that flatten tokens, OPT's,
    are read as (batch, seq, d_ff) through it) and ``valid`` to a (batch, seq) mask to leave
    padding out of the counts; ``observe`` sees each layer's valid hidden rows after truncation.
    The hooks are removed on exit, leaving the model as it was.
    """

    def __init__(
        self,
        sites: MlpSites,
        rules: Mapping[str, TruncationRule] | None = None,
        observe: Observer | None = None,
    ) -> None:
        self.sites, self.rules, self.observe = sites, dict(rules or {}), observe
        self.down = sites.down
        self._gate: dict[str, Tensor] = {}
        unknown = set(self.rules) - set(self.down)
        if unknown:
            raise KeyError(f"rules for unknown layers: {sorted(unknown)}")
        self.shape: tuple[int, int] | None = None
        self.valid: Tensor | None = None
        self.active = {
            name: torch.zeros(width, dtype=torch.int64, device=self.down[name].weight.device)
            for name, width in sites.widths.items()
        }
        self.tokens = dict.fromkeys(self.down, 0)
        # Per sequence: (active (token, unit) pairs, valid tokens) of every layer, for the
        # uncertainty of the activation ratio (a bootstrap over sequences).
        self.sequences: dict[str, list[Tensor]] = {name: [] for name in self.down}
        super().__init__()

    def __enter__(self) -> Truncation:
        for name, module in self.down.items():
            self._hooks.before(module, self._hook(name))
        for name, site in self.sites.gates.items():
            if name in self.rules:
                self._hooks.after(site.module, self._tap(name))
        return self

    def _tap(self, name: str) -> Callable[[nn.Module, tuple, Tensor], None]:
        def hook(_module: nn.Module, _args: tuple, output: Tensor) -> None:
            self._gate[name] = self.sites.gate_of(name, output)

        return hook

    def _released(self) -> None:
        self._gate.clear()

    def _hook(self, name: str) -> Callable[[nn.Module, tuple], tuple | None]:
        rule = self.rules.get(name)

        def hook(module: nn.Module, args: tuple) -> tuple | None:
            given = args[0]
            h = self._as_batch(given)
            w_out = down_weight(module)
            if rule is not None:
                gate = self._as_batch(self._gate.pop(name)) if name in self.sites.gates else h
                h = h.masked_fill(~rule.keep(h, w_out, gate), 0)
            rows = h.reshape(-1, h.shape[-1])
            active = (h != 0).sum(-1).reshape(-1, h.shape[-2])
            tokens = torch.ones_like(active)
            if self.valid is not None:
                valid = self.valid.to(device=rows.device, dtype=torch.bool)
                rows = rows[valid.reshape(-1)]
                active, tokens = active * valid.reshape(active.shape), valid.reshape(active.shape)
            self.sequences[name].append(torch.stack([active.sum(-1), tokens.sum(-1)], dim=-1).cpu())
            self.active[name] += (rows != 0).sum(0)
            self.tokens[name] += rows.shape[0]
            if self.observe is not None and rows.shape[0]:
                self.observe(name, rows, w_out)
            return None if rule is None else (h.reshape(given.shape), *args[1:])

        return hook

    def _as_batch(self, h: Tensor) -> Tensor:
        """``h`` as (batch, seq, d_ff); OPT-style layers flatten the tokens to (tokens, d_ff)."""
        shape = self.shape
        if h.dim() == 2 and shape is not None and h.shape[0] == shape[0] * shape[1]:
            return h.reshape(*shape, h.shape[-1])
        if h.dim() != 3:
            raise ValueError(f"hidden activation of shape {tuple(h.shape)} is not (batch, "
                             "seq, d_ff); set Truncation.shape for layers that flatten "
                             "tokens")  # fmt: skip
        return h

    def activation_ratio(self) -> dict[str, float]:
        """Per layer: active (token, unit) pairs / (valid tokens * d_ff)."""
        return {
            name: float(active.sum()) / max(self.tokens[name] * active.numel(), 1)
            for name, active in self.active.items()
        }

    def sequence_counts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per layer and sequence: active (token, unit) pairs and valid tokens, (layers, n) each
        (n = 0 if some layer never ran), and the layers' widths."""
        widths = np.array(list(self.sites.widths.values()), dtype=float)
        if not self.sequences or not all(self.sequences.values()):
            return np.zeros((len(widths), 0)), np.zeros((len(widths), 0)), widths
        counts = np.stack([torch.cat(v).double().numpy() for v in self.sequences.values()])
        return counts[..., 0], counts[..., 1], widths

    def dead_units(self, min_frac: float = DEAD_FRACTION) -> dict[str, int]:
        """Per layer: units active on fewer than ``min_frac`` of the valid tokens."""
        return {
            name: int(is_dead(active, self.tokens[name], min_frac).sum())
            for name, active in self.active.items()
        }
