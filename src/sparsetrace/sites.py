"""Where a model's MLP hidden activation lives, per architecture: the hook sites that tracing, the
Recorder, the Sparsing Law's truncation and the sparse decode path all use.

The hidden activation is the input of the MLP's down projection, for plain MLPs
(``act(x W_in)``) and gated ones (``act(x W_gate) * (x W_up)``) alike, so one forward pre-hook on
the down projection reads it in every architecture. The names below were checked against
transformers 5.x (``models/*/modeling_*.py``):

=============  ============================================  ===================================
architecture   down projection (hooked module)               hidden activation
=============  ============================================  ===================================
sparsetrace    ``blocks.{i}.mlp.w_out``                      ``act(w_in x)`` (gated: act(g)*u)
gpt2           ``h.{i}.mlp.c_proj`` (a Conv1D)               ``mlp.act(c_fc x)``
opt            ``decoder.layers.{i}.fc2``                    ``activation_fn(fc1 x)`` (ReLU)
gpt_neox       ``layers.{i}.mlp.dense_4h_to_h``              ``mlp.act(dense_h_to_4h x)``
llama          ``layers.{i}.mlp.down_proj``                  ``act_fn(gate_proj x) * up_proj x``
=============  ============================================  ===================================

Patterns match anywhere in the module path, so task heads (``transformer.``, ``model.``,
``gpt_neox.`` prefixes) do not matter. ``gated="gate"`` measures ``act(gate)`` alone: the output
of ``mlp.act_fn`` (Llama family) or ``act`` of the gate half of ``w_in`` (ours).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor, nn

from sparsetrace.errors import UserError
from sparsetrace.model.transformer import Transformer, hidden_name

Gated = Literal["product", "gate"]
GATED_CHOICES: tuple[str, ...] = ("product", "gate")
DOWN_INPUT = "down-projection input"
GATE_OUTPUT = "gate activation"
# A layer selection: None (all), a regex searched in the stable name, a predicate on the name
# (TransformerLens' names_filter), or a list of stable names and layer indices.
LayerSelection = str | Callable[[str], bool] | Sequence[str | int] | None


@dataclass(frozen=True)
class Site:
    """Where one layer's hidden activation is read."""

    layer: int
    name: str  # stable name: blocks.{layer}.mlp.hidden
    path: str  # dotted path of the hooked module inside the model
    module: nn.Module
    output: bool  # False: the activation is the module's forward input; True: its output
    measured: str  # DOWN_INPUT or GATE_OUTPUT
    transform: Callable[[Tensor], Tensor] | None = None  # applied to the hooked tensor


@dataclass(frozen=True)
class Architecture:
    name: str
    down: re.Pattern[str]  # module path of the down projection; group 1 is the layer index
    gate: str | None = None  # sibling module of the down projection whose output is act(gate)


ARCHITECTURES = (
    Architecture("gpt2", re.compile(r"(?:^|\.)h\.(\d+)\.mlp\.c_proj$")),
    Architecture("opt", re.compile(r"(?:^|\.)layers\.(\d+)\.fc2$")),
    Architecture("gpt_neox", re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.mlp\.dense_4h_to_h$")),
    Architecture("llama", re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.down_proj$"), gate="act_fn"),
)


def check_gated(gated: str) -> None:
    if gated not in GATED_CHOICES:
        raise UserError(f"gated must be one of {', '.join(GATED_CHOICES)}; got {gated!r}")


def locate(
    model: nn.Module, gated: Gated = "product", modules: Sequence[str] | None = None
) -> tuple[str, list[Site]]:
    """The architecture's name and its hidden-activation sites in layer order.

    ``modules``: dotted paths of modules whose forward *input* is the hidden activation, in layer
    order (layer ``k`` is the k-th path); they override the architecture table.
    """
    check_gated(gated)
    if modules is not None:
        return "custom", _custom_sites(model, modules)
    if isinstance(model, Transformer):
        return "sparsetrace", _own_sites(model, gated)
    # A wrapper around one of our models (a LightningModule, a task head): its MLPs, as its own.
    own = [m for m in model.modules() if isinstance(m, Transformer)]
    if len(own) == 1:
        return "sparsetrace", _own_sites(own[0], gated)
    named = dict(model.named_modules())
    for arch in ARCHITECTURES:
        found = [(int(m.group(1)), path) for path in named if (m := arch.down.search(path))]
        if found:
            return arch.name, _hf_sites(arch, found, named, gated)
    known = ", ".join(a.name for a in ARCHITECTURES)
    raise UserError(
        f"cannot find the MLPs of {type(model).__name__} (known: sparsetrace, {known}); "
        "name the down projections with modules=[...] (--modules on the command line)"
    )


def _own_sites(model: Transformer, gated: Gated) -> list[Site]:
    if gated == "gate" and not any(mlp.gated for mlp in model.mlps().values()):
        raise UserError(f"gated='gate' needs a gated MLP; this model's is {model.cfg.activation}")
    sites = []
    for layer, (name, mlp) in enumerate(model.mlps().items()):
        prefix = name.removesuffix(".hidden")
        if gated == "gate":
            # w_in computes [gate | up]; the gate activation is act of its first half
            gate = partial(_gate_half, mlp.act)
            sites.append(Site(layer, name, f"{prefix}.w_in", mlp.w_in, True, GATE_OUTPUT, gate))
        else:
            sites.append(Site(layer, name, f"{prefix}.w_out", mlp.w_out, False, DOWN_INPUT))
    return sites


def _gate_half(act: Callable[[Tensor], Tensor], w_in_out: Tensor) -> Tensor:
    return act(w_in_out.chunk(2, dim=-1)[0])


def _hf_sites(
    arch: Architecture, found: list[tuple[int, str]], named: dict[str, nn.Module], gated: Gated
) -> list[Site]:
    layers = dict(found)
    if len(layers) != len(found):
        raise UserError(f"{arch.name}: several MLP stacks share layer indices; pass modules=[...]")
    if gated == "gate" and arch.gate is None:
        raise UserError(f"gated='gate' needs a gated MLP; {arch.name} MLPs are not gated")
    sites = []
    for layer in sorted(layers):
        path, output, measured = layers[layer], False, DOWN_INPUT
        if gated == "gate":
            path, output, measured = f"{path.rpartition('.')[0]}.{arch.gate}", True, GATE_OUTPUT
            if path not in named:
                raise UserError(f"gated='gate': {path} not found (this MLP has no {arch.gate})")
        sites.append(Site(layer, hidden_name(layer), path, named[path], output, measured))
    _check_distinct(sites)
    return sites


def _custom_sites(model: nn.Module, paths: Sequence[str]) -> list[Site]:
    if isinstance(paths, str):
        paths = [paths]
    if not paths:
        raise UserError("modules=[] names no module")
    named = dict(model.named_modules())
    missing = [p for p in paths if p not in named]
    if missing:
        raise UserError(f"modules not found in {type(model).__name__}: {', '.join(missing)}")
    sites = [Site(k, hidden_name(k), p, named[p], False, DOWN_INPUT) for k, p in enumerate(paths)]
    _check_distinct(sites)
    return sites


def _check_distinct(sites: list[Site]) -> None:
    # A module shared by several layers fires its hook once per layer: they cannot be told apart.
    if len({id(s.module) for s in sites}) != len(sites):
        raise UserError("the same module serves several layers; hooks cannot tell them apart")


def parse_layers(text: str) -> LayerSelection:
    r"""A command line's layer selection: "" (all), "0,5" (layer indices) or a regex on the
    stable names (``blocks\.(0|5)\.``)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        return None
    if all(p.lstrip("-").isdigit() for p in parts):
        return [int(p) for p in parts]
    return text


def select(sites: list[Site], layers: LayerSelection) -> list[Site]:
    """The sites chosen by ``layers`` (see :data:`LayerSelection`); none chosen: UserError."""
    if layers is None:
        return sites
    names = ", ".join(s.name for s in sites)
    if isinstance(layers, str):
        try:
            pattern = re.compile(layers)
        except re.error as err:
            raise UserError(f"layers: bad regular expression {layers!r} ({err})") from None
        chosen = [s for s in sites if pattern.search(s.name)]
    elif callable(layers):
        chosen = [s for s in sites if layers(s.name)]
    else:
        wanted = set(layers)
        unknown = wanted - {s.name for s in sites} - {s.layer for s in sites}
        if unknown:
            raise UserError(f"layers: unknown {sorted(map(str, unknown))}; the model has {names}")
        chosen = [s for s in sites if s.name in wanted or s.layer in wanted]
    if not chosen:
        raise UserError(f"layers: {layers!r} selects none of {names}")
    return chosen


def down_weight(module: nn.Module) -> Tensor:
    """A down projection's weight as (d_model, d_ff): column i is what hidden unit i writes.

    ``nn.Linear`` stores (out, in); GPT-2's ``Conv1D`` stores (in, out) and computes ``x W + b``.
    """
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise UserError(f"{type(module).__name__} has no 2-d weight: not a down projection")
    return weight.T if type(module).__name__ == "Conv1D" else weight


@dataclass(frozen=True)
class MlpSites:
    """One model's MLPs for measurements that change activations (truncation): per layer name,
    the down projection (whose input is the hidden activation) and, for gated MLPs whose gate
    activation can be read, the site of ``act(gate)``."""

    architecture: str
    down: dict[str, nn.Module]
    gates: dict[str, Site]

    def gate_of(self, name: str, output: Tensor) -> Tensor:
        """``act(gate)`` from the output of the gate site's module."""
        site = self.gates[name]
        return output if site.transform is None else site.transform(output)

    @property
    def widths(self) -> dict[str, int]:
        """Hidden units per layer."""
        return {name: int(down_weight(m).shape[1]) for name, m in self.down.items()}


def mlp_sites(model: nn.Module, modules: Sequence[str] | None = None) -> MlpSites:
    """:func:`locate`'s down projections of ``model`` with their gate sites (none for plain MLPs,
    for ``modules`` given by hand, or where the gate activation is not a module of its own)."""
    architecture, sites = locate(model, "product", modules)
    down = {s.name: s.module for s in sites}
    for module in down.values():
        down_weight(module)  # refuse a module that is not a projection before any hook runs
    gates: dict[str, Site] = {}
    if modules is None:
        try:
            gates = {s.name: s for s in locate(model, "gate")[1]}
        except UserError:  # not gated, or the gate activation is computed inline
            gates = {}
    return MlpSites(architecture, down, gates)


def activation_of(model: nn.Module) -> str:
    """The MLP activation's name: ours (also inside a wrapper) from its config, a transformers
    model from config.json (:func:`config_activation`)."""
    own = [m for m in model.modules() if isinstance(m, Transformer)]
    if own:
        return own[0].cfg.activation
    return config_activation(getattr(model, "config", None))


def config_context(config: object) -> int | None:
    """The context length a Hugging Face config names (``max_position_embeddings``, GPT-2's
    ``n_positions``); None when it names none."""
    for key in ("max_position_embeddings", "n_positions"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return None


def config_activation(config: object) -> str:
    """The MLP activation named in a Hugging Face config (``activation_function`` in GPT-2 and
    OPT, ``hidden_act`` in Llama and GPT-NeoX); "unknown" when it names none."""
    for key in ("activation_function", "hidden_act", "hidden_activation"):
        if isinstance(getattr(config, key, None), str):
            return getattr(config, key)
    return "unknown"


def embedding(model: nn.Module) -> nn.Embedding:
    """The token embedding of ours or of a transformers model."""
    return model.tok_emb if isinstance(model, Transformer) else model.get_input_embeddings()


def input_device(model: nn.Module, device: torch.device | None = None) -> torch.device:
    """Where the token ids go: the embedding's device (a device_map may put it anywhere; on the
    meta device, offloaded, they go to ``device``)."""
    where = embedding(model).weight.device
    return (device or torch.device("cpu")) if where.type == "meta" else where


class Hooks:
    """Forward hooks on one model's modules, removed together (:meth:`remove`)."""

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def before(self, module: nn.Module, fn: Callable[..., Any], with_kwargs: bool = False) -> None:
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs))

    def after(self, module: nn.Module, fn: Callable[..., Any]) -> None:
        self._handles.append(module.register_forward_hook(fn))

    def on_sites(
        self,
        sites: Sequence[Site],
        on_input: Callable[[int, nn.Module, tuple], Any],
        on_output: Callable[[int, nn.Module, tuple, Tensor], Any],
    ) -> None:
        """Each site's activation, by site index: its module's input or its output."""
        for i, site in enumerate(sites):
            if site.output:
                self.after(site.module, partial(on_output, i))
            else:
                self.before(site.module, partial(on_input, i))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class HookContext:
    """A context manager over :class:`Hooks` (``self._hooks``): subclasses register them in
    ``__enter__``; leaving the block removes them, whatever happened, then calls
    :meth:`_released`."""

    def __init__(self) -> None:
        self._hooks = Hooks()

    def __exit__(self, *exc: object) -> None:
        self._hooks.remove()
        self._released()

    def _released(self) -> None:
        """What else to drop once the hooks are gone."""
