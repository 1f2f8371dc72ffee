"""Applying truncation rules to a model: forward pre-hooks on its MLP down projections.

Generic over ``{name: down projection (nn.Linear)}``: the hidden activation is the input of the
down projection for plain and gated MLPs alike, so the same hooks serve any model once the
mapping is given (:func:`transformer_down_projections` for ours; for a Hugging Face Llama it would
be ``{f"layers.{i}": layer.mlp.down_proj}``).

Some rules decide on the *gate* of a gated MLP, ``act(W_gate x)``, rather than on the product
``act(W_gate x) * (W_up x)`` the down projection sees (the Sparsing Law's Top-k and FAT-ε baselines
in the public code act on ``act(gate)``). ``gates`` maps a layer to a :class:`GateTap` that
captures it from the module producing it; for a plain MLP the gate is the hidden activation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from sparsetrace.sparsing.cett import DEAD_FRACTION, is_dead, kept, unit_norms

Observer = Callable[[str, Tensor, Tensor], None]  # (layer name, valid hidden rows, W_out) -> None


class Rule(Protocol):
    """A truncation rule: which entries of a hidden activation (..., d_ff) to keep, given the
    down projection's weight and the layer's gate activation (``h`` itself for a plain MLP)."""

    def keep(self, h: Tensor, w_out: Tensor, gate: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class GateTap:
    """Where a gated MLP's gate activation comes from: ``act_of(output of module)``."""

    module: nn.Module
    act_of: Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Threshold:
    """CETT-style truncation: zero entries with ``|a| * ||W_out[:, i]|| < tau``.

    Sparsing Law, "PPL-p% sparsity": at inference the rule prunes ``|a| < tau / ||W_out[:, i]||``;
    the hook evaluates it in the n-form so that it agrees bit for bit with the metrics.
    """

    tau: float

    def keep(self, h: Tensor, w_out: Tensor, gate: Tensor) -> Tensor:
        return kept(unit_norms(h, w_out), self.tau)


def transformer_down_projections(model: nn.Module) -> dict[str, nn.Linear]:
    """Our Transformer's down projections by hidden-activation name (``blocks.{i}.mlp.hidden``)."""
    return {name: mlp.w_out for name, mlp in model.mlps().items()}


def transformer_gates(model: nn.Module) -> dict[str, GateTap]:
    """Our Transformer's gate activations, ``act(gate)`` from the first half of ``w_in``'s output,
    for its gated MLPs (plain MLPs need none: their gate is the hidden activation)."""
    return {
        name: GateTap(mlp.w_in, lambda out, act=mlp.act: act(out.chunk(2, dim=-1)[0]))
        for name, mlp in model.mlps().items()
        if mlp.gated
    }


class Truncation:
    """Context manager: hooks on each down projection that apply ``rules`` (none: dense) and count,
    per unit, the valid tokens on which it is active (nonzero after truncation).

    Set ``valid`` to a (batch, seq) mask before a forward to leave padding out of the counts;
    ``observe`` sees each layer's valid hidden rows after truncation. The hooks are removed on
    exit, leaving the model as it was.
    """

    def __init__(
        self,
        down: Mapping[str, nn.Linear],
        rules: Mapping[str, Rule] | None = None,
        observe: Observer | None = None,
        gates: Mapping[str, GateTap] | None = None,
    ) -> None:
        self.down, self.rules, self.observe = dict(down), dict(rules or {}), observe
        self.gates = dict(gates or {})
        self._gate: dict[str, Tensor] = {}
        unknown = set(self.rules) - set(self.down)
        if unknown:
            raise KeyError(f"rules for unknown layers: {sorted(unknown)}")
        self.valid: Tensor | None = None
        self.active = {
            name: torch.zeros(m.in_features, dtype=torch.int64, device=m.weight.device)
            for name, m in self.down.items()
        }
        self.tokens = dict.fromkeys(self.down, 0)
        # Per sequence: (active (token, unit) pairs, valid tokens) of every layer, for the
        # uncertainty of the activation ratio (a bootstrap over sequences).
        self.sequences: dict[str, list[Tensor]] = {name: [] for name in self.down}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> Truncation:
        for name, module in self.down.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        for name, tap in self.gates.items():
            if name in self.rules:
                self._handles.append(tap.module.register_forward_hook(self._tap(name, tap)))
        return self

    def _tap(self, name: str, tap: GateTap) -> Callable[[nn.Module, tuple, Tensor], None]:
        def hook(_module: nn.Module, _args: tuple, output: Tensor) -> None:
            self._gate[name] = tap.act_of(output)

        return hook

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._gate.clear()

    def _hook(self, name: str) -> Callable[[nn.Module, tuple], tuple | None]:
        rule = self.rules.get(name)

        def hook(module: nn.Module, args: tuple) -> tuple | None:
            h = args[0]
            if rule is not None:
                gate = self._gate.pop(name) if name in self.gates else h
                h = h.masked_fill(~rule.keep(h, module.weight, gate), 0)
            rows = h.reshape(-1, h.shape[-1])
            active = (h != 0).sum(-1).reshape(-1, h.shape[-2] if h.dim() > 2 else 1)
            tokens = torch.ones_like(active)
            if self.valid is not None:
                valid = self.valid.to(device=rows.device, dtype=torch.bool)
                rows = rows[valid.reshape(-1)]
                active, tokens = active * valid.reshape(active.shape), valid.reshape(active.shape)
            self.sequences[name].append(torch.stack([active.sum(-1), tokens.sum(-1)], dim=-1).cpu())
            self.active[name] += (rows != 0).sum(0)
            self.tokens[name] += rows.shape[0]
            if self.observe is not None and rows.shape[0]:
                self.observe(name, rows, module.weight)
            return None if rule is None else (h, *args[1:])

        return hook

    def activation_ratio(self) -> dict[str, float]:
        """Per layer: active (token, unit) pairs / (valid tokens * d_ff)."""
        return {
            name: float(active.sum()) / max(self.tokens[name] * active.numel(), 1)
            for name, active in self.active.items()
        }

    def sequence_counts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per layer and sequence: active (token, unit) pairs and valid tokens, (layers, n) each
        (n = 0 if some layer never ran), and the layers' widths."""
        widths = np.array([m.in_features for m in self.down.values()], dtype=float)
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
