"""``trace``: hidden-unit use of any supported model, measured by hooks during its forward passes.

Each forward pass of the traced model is one *batch*. A forward pre-hook on the model itself
starts the batch and captures its ``attention_mask`` (any forward argument of that name, keyword
or positional); a hook per layer (see :mod:`sparsetrace.sites`) reduces the layer's
hidden activation to per-sequence use counts on the activation's own device and keeps only a
handful of numbers per batch and layer plus two (hidden,) masks per layer, so memory stays flat
however much data passes.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from sparsetrace.errors import UserError
from sparsetrace.metrics import DEFAULT_PERCENTILES, UseStats, use_counts, use_stats_from_counts
from sparsetrace.rundir import SPARSITY_BASE_COLUMNS, percentile_column
from sparsetrace.sites import Gated, HookContext, LayerSelection, Site, locate, select

SITE_COLUMNS = ["layer", "name", "module", "measured", "hidden"]
# per_token ... seq_batch_ratio, in sparsity.csv's order
METRIC_COLUMNS = SPARSITY_BASE_COLUMNS[SPARSITY_BASE_COLUMNS.index("per_token") :]
COUNT_COLUMNS = ["per_token", "per_sequence", "per_batch"]


def forward_inputs(
    signature: inspect.Signature, args: tuple, kwargs: dict[str, Any]
) -> tuple[tuple[int, ...] | None, Tensor | None]:
    """(batch, seq) of a model call's first tensor input — for layers that flatten tokens (OPT's
    fc1/fc2 see (b*s, d)) — and its ``attention_mask`` if any, from a forward pre-hook."""
    try:
        bound = dict(signature.bind_partial(*args, **kwargs).arguments)
    except TypeError:
        bound = dict(kwargs)
    # Wrappers (DDP: forward(*inputs, **kwargs)) pass everything through varargs: unpack them.
    for name, param in signature.parameters.items():
        if name in bound and param.kind is inspect.Parameter.VAR_KEYWORD:
            bound.update(bound.pop(name))
        elif name in bound and param.kind is inspect.Parameter.VAR_POSITIONAL:
            bound.update({f"{name}[{i}]": v for i, v in enumerate(bound.pop(name))})
    shapes = [v.shape[:2] for v in bound.values() if isinstance(v, Tensor) and v.dim() >= 2]
    mask = bound.get("attention_mask")
    return (tuple(shapes[0]) if shapes else None), (mask if isinstance(mask, Tensor) else None)


class Trace(HookContext):
    """Hooks on a model's MLP hidden activations that record use statistics per forward pass.

    Use through :func:`trace`. Results stay readable after the ``with`` block ends.
    """

    def __init__(
        self, model: nn.Module, sites: list[Site], architecture: str, percentiles: Sequence[float]
    ) -> None:
        self.model, self.sites, self.architecture = model, sites, architecture
        self.percentiles = [float(p) for p in percentiles]
        self._rows: list[tuple[int, int, list[float]]] = []  # (batch, site index, values)
        self._hidden: dict[str, int] = {}
        self._first_used: dict[str, Tensor] = {}
        self._ever_used: dict[str, Tensor] = {}  # on the activation's device until read
        super().__init__()
        self._signature = inspect.signature(model.forward)
        self._mask: Tensor | None = None  # set_mask's; takes precedence over the captured one
        self._batch = -1  # index of the forward pass in progress
        self._batch_shape: tuple[int, ...] | None = None
        self._captured_mask: Tensor | None = None
        self._device_masks: dict[torch.device, Tensor] = {}
        self._done: set[int] = set()  # sites recorded in the current batch

    def __enter__(self) -> Trace:
        self._hooks.before(self.model, self._start_batch, with_kwargs=True)
        self._hooks.on_sites(self.sites, self._on_input, self._on_output)
        return self

    def set_mask(self, mask: Tensor | None) -> None:
        """Real-token mask (batch, seq) for the following forward passes, instead of the
        captured ``attention_mask``; None goes back to the captured one."""
        if mask is not None and mask.dim() != 2:
            raise UserError(f"mask must be (batch, seq); got shape {tuple(mask.shape)}")
        self._mask = mask

    @property
    def n_batches(self) -> int:
        return self._batch + 1

    @property
    def first_batch_used(self) -> dict[str, Tensor]:
        """Per layer, the units used in the first traced batch (bool (hidden,), CPU)."""
        return dict(self._first_used)

    @property
    def ever_used(self) -> dict[str, Tensor]:
        """Per layer, the units used in any traced batch (bool (hidden,), CPU)."""
        return {name: used.cpu() for name, used in self._ever_used.items()}

    # ----------------------------------------------------------------------------------------
    # hooks

    def _start_batch(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self._batch += 1
        self._batch_shape, self._captured_mask = forward_inputs(self._signature, args, kwargs)
        self._device_masks.clear()
        self._done.clear()

    def _on_input(self, index: int, module: nn.Module, args: tuple) -> None:
        self._record(index, args[0])

    def _on_output(self, index: int, module: nn.Module, args: tuple, output: Tensor) -> None:
        self._record(index, output)

    def _record(self, index: int, h: Tensor) -> None:
        site = self.sites[index]
        if self._batch < 0:
            raise UserError(f"{site.path} ran outside a forward pass of the traced model")
        if index in self._done:  # recomputed in the same batch (gradient checkpointing)
            return
        self._done.add(index)
        with torch.no_grad():
            h = h.detach()
            if site.transform is not None:
                h = site.transform(h)
            h = self._as_batch(site, h)
            mask = self._mask_for(h)
            batch, seq = h.shape[:2]
            counts = use_counts(h, mask)
            lens = torch.full((batch,), seq, device=h.device) if mask is None else mask.sum(-1)
            s = use_stats_from_counts(counts, lens, self.percentiles)
            values = [(lens > 0).sum(), lens.sum(), s.per_token, s.per_sequence, s.per_batch]
            values += list(s.percentiles.values())
            dtype = torch.float32 if h.device.type == "mps" else torch.float64  # no float64 on MPS
            row = torch.stack([v.to(dtype) for v in values]).tolist()  # the one host transfer
        self._rows.append((self._batch, index, row))
        self._hidden[site.name] = s.hidden
        if site.name not in self._first_used:
            self._first_used[site.name] = s.batch_used.cpu()
        ever = self._ever_used.get(site.name)
        self._ever_used[site.name] = s.batch_used if ever is None else ever | s.batch_used

    def _as_batch(self, site: Site, h: Tensor) -> Tensor:
        if h.dim() == 2 and self._batch_shape and math.prod(self._batch_shape) == h.shape[0]:
            return h.reshape(*self._batch_shape, h.shape[-1])
        if h.dim() != 3:
            raise UserError(
                f"{site.path}: activation of shape {tuple(h.shape)} is not (batch, seq, hidden)"
            )
        return h

    def _mask_for(self, h: Tensor) -> Tensor | None:
        mask = self._mask if self._mask is not None else self._captured_mask
        if mask is None:
            return None
        cached = self._device_masks.get(h.device)
        if cached is None:
            batch, seq = h.shape[:2]
            if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] < seq:
                raise UserError(
                    f"mask shape {tuple(mask.shape)} does not fit activations' (batch, seq) "
                    f"{(batch, seq)}; give the real-token mask with set_mask"
                )
            # With a KV cache the mask also covers the past tokens; the current ones come last.
            cached = mask[:, -seq:].to(h.device, torch.bool)
            self._device_masks[h.device] = cached
        return cached

    # ----------------------------------------------------------------------------------------
    # results

    def summary(self, aggregate: bool = False) -> pd.DataFrame:
        """One row per traced batch x layer (``aggregate``: per layer, the mean over batches).

        Columns: ``batch`` (or ``batches``), the site (``layer, name, module, measured, hidden``),
        ``sequences`` and ``tokens`` (real ones; summed when aggregated), then the metric columns
        of sparsity.csv. Aggregated ratios are ratios of the mean counts, as in sparsity.csv.
        """
        pcols = [percentile_column(p) for p in self.percentiles]
        raw = ["sequences", "tokens", *COUNT_COLUMNS, *pcols]
        frame = pd.DataFrame(
            [(b, *self._site_row(i), *values) for b, i, values in self._rows],
            columns=["batch", *SITE_COLUMNS, *raw],
        ).astype({"sequences": "int64", "tokens": "int64"})
        if aggregate:
            sums = {c: (c, "sum") for c in ("sequences", "tokens")}
            means = {c: (c, "mean") for c in (*COUNT_COLUMNS, *pcols)}
            frame = (
                frame.groupby(SITE_COLUMNS, sort=False)
                .agg(batches=("batch", "size"), **sums, **means)
                .reset_index()
                .sort_values("layer", ignore_index=True)
            )
        for col in COUNT_COLUMNS:
            frame[f"{col}_frac"] = frame[col] / frame["hidden"]
        frame["token_seq_ratio"] = _ratio(frame["per_token"], frame["per_sequence"])
        frame["seq_batch_ratio"] = _ratio(frame["per_sequence"], frame["per_batch"])
        first = "batches" if aggregate else "batch"
        return frame[[first, *SITE_COLUMNS, "sequences", "tokens", *METRIC_COLUMNS, *pcols]]

    def layer_stats(self) -> dict[str, UseStats]:
        """Per layer, the mean over traced batches as :class:`UseStats` (for a run directory's
        sparsity.csv); its ``batch_used`` is the union over the batches (:attr:`ever_used`)."""
        ever = self.ever_used
        return {
            row.name: UseStats(
                hidden=int(row.hidden),
                per_token=torch.tensor(row.per_token, dtype=torch.float64),
                per_sequence=torch.tensor(row.per_sequence, dtype=torch.float64),
                per_batch=torch.tensor(row.per_batch, dtype=torch.float64),
                percentiles={
                    p: torch.tensor(getattr(row, percentile_column(p)), dtype=torch.float64)
                    for p in self.percentiles
                },
                batch_used=ever[row.name],
            )
            for row in self.summary(aggregate=True).itertuples(index=False)
        }

    def _site_row(self, index: int) -> tuple[int, str, str, str, int]:
        site = self.sites[index]
        return site.layer, site.name, site.path, site.measured, self._hidden[site.name]


def _ratio(num: pd.Series, den: pd.Series) -> pd.Series:
    """num / den, NaN where den is 0 (0/0), as UseStats' ratios."""
    return num / den.where(den > 0)


def trace(
    model: nn.Module,
    layers: LayerSelection = None,
    gated: Gated = "product",
    modules: Sequence[str] | None = None,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> Trace:
    """Trace the MLP hidden-unit use of ``model``: ``with trace(model) as t: model(...)``.

    ``layers``: None (all), a regex searched in the stable names ``blocks.{i}.mlp.hidden``, a
    predicate on them, or a list of names and layer indices. ``gated``: for gated MLPs, measure
    the down projection's input ``act(gate) * up`` ("product") or ``act(gate)`` alone ("gate").
    ``modules``: dotted paths of modules whose forward input is the hidden activation, in layer
    order, for architectures :mod:`sparsetrace.sites` does not know.
    """
    architecture, sites = locate(model, gated, modules)
    return Trace(model, select(sites, layers), architecture, percentiles)
