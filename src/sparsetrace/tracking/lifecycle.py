"""Which hidden units are on at the first batch, turn on, turn off, never turn on.

Paper: Wild & Anderson, Table 2 and sections 3.1, 4.1-4.2.

The tracker is fed, at every measured step, each layer's per-batch use mask (a unit is "on" in
a batch when any token of the batch uses it). Relative to the *first measured batch*:
- turned on  = off in the first batch, on in the latest;
- turned off = on in the first batch, off in the latest;
- never used = off in the first batch and never turned on, i.e. off in the first and in the
  latest batch: Table 2's arithmetic (100 % - on at batch 0 - turned on), the paper's "~5 % ...
  at or below zero for every token at initialization and never turn on". It does not depend on
  how often a run measures (a share "off in every measured batch" shrinks the more batches are
  measured); ``ever_used`` keeps the latter for who needs it.
Between consecutive measured batches it also counts the units switching off and on, for the
"when do units die" plot (section 4.2). State is a handful of (hidden,) arrays per layer plus one
small row per measured step; it round-trips through :meth:`state_dict` / :meth:`load_state_dict`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerLifecycle:
    """Lifecycle state of one layer's hidden units (all tensors on CPU, shape (hidden,))."""

    first_used: torch.Tensor
    latest_used: torch.Tensor
    ever_used: torch.Tensor
    first_step_used: torch.Tensor  # -1 where never used
    last_step_used: torch.Tensor  # -1 where never used
    # One row per measured step: (step, units on, switched off since previous, switched on since).
    transitions: list[tuple[int, int, int, int]] = field(default_factory=list)

    @classmethod
    def start(cls, step: int, used: torch.Tensor) -> LayerLifecycle:
        never = torch.full(used.shape, -1, dtype=torch.long)
        seen = torch.where(used, step, never)
        return cls(
            used.clone(),
            used.clone(),
            used.clone(),
            seen.clone(),
            seen.clone(),
            [(step, int(used.sum()), 0, 0)],
        )

    @property
    def hidden(self) -> int:
        return int(self.first_used.numel())

    def update(self, step: int, used: torch.Tensor) -> None:
        off = int((self.latest_used & ~used).sum())
        on = int((~self.latest_used & used).sum())
        self.transitions.append((step, int(used.sum()), off, on))
        self.first_step_used = torch.where(self.ever_used | ~used, self.first_step_used, step)
        self.last_step_used = torch.where(used, step, self.last_step_used)
        # A new tensor, not in place: state_dict() hands out these tensors, and a snapshot kept
        # in memory must not change as training goes on.
        self.ever_used = self.ever_used | used
        self.latest_used = used.clone()

    def summary(self) -> dict[str, float]:
        """Table 2 row (fractions of hidden units) plus the never-used share."""
        n = self.hidden
        return {
            "on_first_batch": float(self.first_used.sum()) / n,
            "turned_on": float((~self.first_used & self.latest_used).sum()) / n,
            "turned_off": float((self.first_used & ~self.latest_used).sum()) / n,
            "final_use": float(self.latest_used.sum()) / n,
            "never_used": float((~self.first_used & ~self.latest_used).sum()) / n,
        }


class LifecycleTracker:
    """Per-layer :class:`LayerLifecycle`, keyed by the layer's stable name."""

    def __init__(self) -> None:
        self.layers: dict[str, LayerLifecycle] = {}

    def update(self, step: int, batch_used: dict[str, torch.Tensor]) -> None:
        """Feed each layer's per-batch use mask (bool (hidden,)) measured at ``step``."""
        for name, used in batch_used.items():
            used = used.detach().to("cpu", torch.bool).reshape(-1)
            layer = self.layers.get(name)
            if layer is None:
                self.layers[name] = LayerLifecycle.start(step, used)
            elif used.numel() != layer.hidden:
                raise ValueError(
                    f"{name}: use mask has {used.numel()} units, the tracker has {layer.hidden}"
                )
            else:
                layer.update(step, used)

    def summary(self) -> dict[str, dict[str, float]]:
        return {name: layer.summary() for name, layer in self.layers.items()}

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {
            name: {
                "first_used": lc.first_used,
                "latest_used": lc.latest_used,
                "ever_used": lc.ever_used,
                "first_step_used": lc.first_step_used,
                "last_step_used": lc.last_step_used,
                "transitions": torch.tensor(lc.transitions, dtype=torch.long).reshape(-1, 4),
            }
            for name, lc in self.layers.items()
        }

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        self.layers = {
            name: LayerLifecycle(
                first_used=s["first_used"].bool().clone(),
                latest_used=s["latest_used"].bool().clone(),
                ever_used=s["ever_used"].bool().clone(),
                first_step_used=s["first_step_used"].long().clone(),
                last_step_used=s["last_step_used"].long().clone(),
                transitions=[tuple(int(v) for v in row) for row in s["transitions"].tolist()],
            )
            for name, s in state.items()
        }
