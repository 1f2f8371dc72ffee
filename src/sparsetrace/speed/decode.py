"""Models for the speed measurement: sparse down projections swapped in, batch-1 decoding with a
KV cache, activation patterns, and larger shapes with a measured sparsity transplanted.

:func:`sparsify` replaces every MLP down projection that :func:`sparsetrace.sites.locate`
finds (ours, GPT-2, OPT, GPT-NeoX, Llama families) by a :class:`SparseDown`, and up projections
by a :class:`SparseUp` where one pays (gated ReLU; the int8 screen on request); the model's own
forward then runs the sparse path. :func:`decode_seconds` times greedy decoding of new tokens,
one at a time, after a prompt (prefill not timed), for our Transformer (its ``KVCache``) and for
Hugging Face causal LMs (``past_key_values``).

A shape where batch-1 decoding is memory-bound (GPT-2-medium: 24 x 2 x 16 MiB of MLP weights) is
built from random weights (:func:`transplant`): our Transformer at that shape, GPT-2
conventions, with each layer's up-projection bias shifted so that the layer's units are active
for the fraction of tokens measured in a trained model (its layer at the same relative depth).
The sparsity is the trained model's; the weights are not — outputs say so.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn

from sparsetrace.errors import UserError
from sparsetrace.model.transformer import KVCache, ModelConfig, Transformer
from sparsetrace.sites import activation_of, locate
from sparsetrace.speed.dense_gemv import DenseGemv
from sparsetrace.speed.sparse_down import DEFAULT_KERNEL, SparseDown
from sparsetrace.speed.sparse_up import SparseGatedMlp, SparseUp

RELU = ("relu", "relu2", "reglu")  # exact zeros: no threshold needed


@dataclass(frozen=True)
class DecoderShape:
    """A decoder's size: what sets the bytes read per token."""

    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    vocab_size: int
    seq_len: int


SHAPES = {  # published configurations (config.json of each model on the Hugging Face hub)
    "gpt2-medium": DecoderShape(1024, 24, 16, 4096, 50257, 1024),
    "opt-350m": DecoderShape(1024, 24, 16, 4096, 50272, 2048),  # its decoder MLP is ReLU
    "gpt2-large": DecoderShape(1280, 36, 20, 5120, 50257, 1024),
}


def parse_shape(text: str) -> DecoderShape:
    """A named shape or ``d_model,n_layers,n_heads,d_ff[,vocab]``."""
    if text in SHAPES:
        return SHAPES[text]
    try:
        values = [int(v) for v in text.split(",")]
        if len(values) not in (4, 5) or min(values) <= 0:
            raise ValueError
    except ValueError:
        raise UserError(f"--shape: one of {', '.join(SHAPES)} or d_model,n_layers,n_heads,d_ff"
                        f"[,vocab]; got {text!r}") from None  # fmt: skip
    d, n, h, ff, *vocab = values
    if d % h:
        raise UserError(f"--shape: d_model {d} is not divisible by n_heads {h}")
    return DecoderShape(d, n, h, ff, vocab[0] if vocab else 50257, 1024)


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


UP_PATHS = ("dense", "screen")  # the up projection: read in full, or int8-screened (exact)


def sparsify(
    model: nn.Module, taus: Sequence[float] | None = None, kernel: str = DEFAULT_KERNEL,
    max_rows: int | None = None, up: str = "dense", margin: float = 1.0,
) -> list[SparseDown]:  # fmt: skip
    """Swap the model's MLP projections for sparse ones, in place; returns the SparseDowns in
    layer order (every down projection becomes one).

    ``taus``: each layer's CETT threshold; required unless the activation is ReLU (exact). Up
    projections: our ReGLU models' become gate-sparse :class:`SparseUp`s, as do the gate and up
    projections of Llama-family models with a ReLU gate (their MLPs become
    :class:`SparseGatedMlp`s); our plain models' are read in full by a :class:`DenseGemv`, the
    sparse paths' kernel family. ``up="screen"`` screens our ReLU-family models' (gate)
    pre-activations with the int8 bound first (``margin`` < 1: inexact)."""
    activation = activation_of(model)
    if taus is None and activation not in RELU:
        raise UserError(
            f"the MLP activation is {activation}, not ReLU: its sparse path needs each layer's "
            "CETT threshold; compute them with `sparsetrace sparsing-law RUN --final-only` "
            "(PPL-p% sparsity) and pass the run, or use a ReLU model"
        )
    if up not in UP_PATHS:
        raise UserError(f"up must be one of {', '.join(UP_PATHS)}; got {up!r}")
    if not 0 <= margin <= 1 or (up != "screen" and margin != 1):
        raise UserError(f"margin: a number in [0, 1] for up='screen' (1: exact); got {margin}")
    if up == "screen" and not (_is_ours(model) and activation in RELU):
        raise UserError(f"the int8 screen needs a sparsetrace model with a ReLU-family MLP "
                        f"(relu, relu2, reglu); this one is {activation}")  # fmt: skip
    _, sites = locate(model)
    if taus is not None and len(taus) != len(sites):
        raise UserError(f"{len(taus)} thresholds for {len(sites)} MLP layers")
    options = {} if max_rows is None else {"max_rows": max_rows}
    swapped = []
    llama_relu = _llama_relu(model)
    for site in sites:
        tau = None if taus is None else float(taus[site.layer])
        down = SparseDown.from_module(site.module, tau=tau, kernel=kernel, **options)
        if llama_relu:  # the whole MLP: its up projection is skipped by the gate too
            path = site.path.rpartition(".")[0]
            _set_module(model, path, SparseGatedMlp(model.get_submodule(path), down, **options))
        else:
            _set_module(model, site.path, down)
        swapped.append(down)
    gated = activation == "reglu"
    if _is_ours(model):
        for block in model.blocks:
            if gated or up == "screen":
                block.mlp.w_in = SparseUp.from_module(block.mlp.w_in, gated=gated,
                                                      screen=up == "screen", margin=margin,
                                                      **options)  # fmt: skip
            else:  # read in full, on the sparse paths' kernel family (DenseGemv's why)
                block.mlp.w_in = DenseGemv.from_module(block.mlp.w_in, **options)
    return swapped


def sparse_ups(model: nn.Module) -> list[SparseUp]:
    """The model's SparseUps in layer order (none: its up projections are dense)."""
    return [m for m in model.modules() if isinstance(m, SparseUp)]


def _llama_relu(model: nn.Module) -> bool:
    """A transformers model whose MLPs are Llama's gated form with a ReLU gate."""
    architecture, sites = locate(model)
    if architecture != "llama" or activation_of(model) != "relu":
        return False
    return hasattr(model.get_submodule(sites[0].path.rpartition(".")[0]), "up_proj")


def mlp_paths(model: nn.Module) -> list[str]:
    """The modules :func:`sparsify` may swap: down projections, and our models' up
    projections (Llama-family ReLU models: the whole MLPs)."""
    paths = [site.path for site in locate(model)[1]]
    if _llama_relu(model):
        return [path.rpartition(".")[0] for path in paths]
    if _is_ours(model):
        paths += [f"blocks.{i}.mlp.w_in" for i in range(len(model.blocks))]
    return paths


def _is_ours(model: nn.Module) -> bool:
    return isinstance(model, Transformer)


@torch.inference_mode()
def decode(model: nn.Module, prompt: Tensor, new_tokens: int) -> tuple[Tensor, Tensor]:
    """Greedy decoding with a KV cache: (the new tokens, the logits of each new step)."""
    logits_seen, tokens = [], []
    if _is_ours(model):
        cache = KVCache(model.cfg.n_layers)

        def step(ids: Tensor) -> Tensor:
            return model(ids, cache=cache).logits[:, -1]
    else:
        # transformers 5.x names the cache `cache`; earlier versions `past_key_values`
        key = "cache" if "cache" in inspect.signature(model.forward).parameters else (
            "past_key_values")  # fmt: skip
        state: dict = {}

        def step(ids: Tensor) -> Tensor:
            out = model(input_ids=ids, use_cache=True, **state)
            state[key] = getattr(out, key)
            return out.logits[:, -1]

    logits = step(prompt)
    for _ in range(new_tokens):
        nxt = logits.argmax(-1, keepdim=True)
        tokens.append(nxt)
        logits_seen.append(logits)
        logits = step(nxt)
    if not tokens:  # prefill only
        return prompt[:, :0], logits[:, None][:, :0]
    return torch.cat(tokens, 1), torch.stack(logits_seen, 1)


def decode_seconds(
    runs: Mapping[str, Callable[[int], object]], new_tokens: int, repeats: int
) -> dict[str, float]:
    """Seconds per new token of each variant (``runs[name](n)`` decodes n new tokens), the
    variants interleaved; the prompt's prefill (``n = 0``) is timed alike and subtracted."""
    from sparsetrace.speed.measure import best_times

    calls = {}
    for name, run in runs.items():
        calls[name] = partial(run, new_tokens)
        calls[f"{name} prefill"] = partial(run, 0)
    t = best_times(calls, repeats)
    # a prefill slower than the whole run is noise: never report a zero or negative time
    return {name: max(t[name] - t[f"{name} prefill"], 1e-3 * t[name]) / new_tokens
            for name in runs}  # fmt: skip


@dataclass(repr=False, eq=False)  # a model inside: no field-wise repr or equality
class Swap:
    """A model whose projections at ``paths`` switch between the dense modules and the modules
    that replace them (``downs``, ``ups``: the SparseDowns and SparseUps among them, if any).
    Built by :meth:`sparse` (the sparse paths of :func:`sparsify`) or :meth:`gemv`."""

    model: nn.Module
    paths: list[str]
    dense: list[nn.Module]
    modules: list[nn.Module]
    downs: list[SparseDown] = field(default_factory=list)
    ups: list[SparseUp] = field(default_factory=list)

    @classmethod
    def sparse(
        cls, model: nn.Module, taus: Sequence[float] | None, kernel: str, up: str = "dense",
        margin: float = 1.0, max_rows: int | None = None,
    ) -> Swap:  # fmt: skip
        """:func:`sparsify` ``model``; returned dense (``use(sparse=True)`` switches)."""
        paths = mlp_paths(model)
        dense = [model.get_submodule(path) for path in paths]
        downs = sparsify(model, taus, kernel, max_rows, up, margin)
        swap = cls(model, paths, dense, [model.get_submodule(path) for path in paths], downs,
                   sparse_ups(model))  # fmt: skip
        swap.use(sparse=False)
        return swap

    @classmethod
    def gemv(cls, model: Transformer, everywhere: bool = False) -> Swap:
        """Our model with every MLP projection (``everywhere``: every linear layer) on the dense
        numba GEMV (:class:`DenseGemv`) when "sparse": the baseline that shares the sparse
        paths' kernel family."""
        paths = mlp_paths(model)
        if everywhere:
            paths += [name for name, m in model.named_modules()
                      if isinstance(m, nn.Linear) and name not in paths]  # fmt: skip
        dense = [model.get_submodule(path) for path in paths]
        return cls(model, paths, dense, [DenseGemv.from_module(module) for module in dense])

    def use(self, sparse: bool) -> nn.Module:
        for path, module in zip(self.paths, self.modules if sparse else self.dense, strict=True):
            _set_module(self.model, path, module)
        return self.model


@torch.inference_mode()
def active_patterns(
    model: nn.Module, batches: Sequence[Tensor], taus: Sequence[float] | None = None
) -> tuple[list[Tensor] | None, list[Tensor]]:
    """Per layer: the active units (tokens, d_ff, bool) of ``batches`` (token ids), read at the
    down projections (nonzero, or kept at ``taus``), and — for our models — the MLP inputs
    (tokens, d_model) that the block timing feeds its up projections (None otherwise)."""
    from sparsetrace.sparsing.cett import kept, unit_norms

    sites = locate(model)[1]
    inputs: dict[int, list[Tensor]] = {site.layer: [] for site in sites}
    active: dict[int, list[Tensor]] = {site.layer: [] for site in sites}

    def on_down(module: nn.Module, args: tuple, layer: int) -> None:
        h = args[0].reshape(-1, args[0].shape[-1])
        on = h != 0 if taus is None else kept(unit_norms(h, module.weight), taus[layer])
        active[layer].append(on)

    def on_mlp(_module: nn.Module, args: tuple, layer: int) -> None:
        inputs[layer].append(args[0].reshape(-1, args[0].shape[-1]).float())

    hooks = [site.module.register_forward_pre_hook(partial(on_down, layer=site.layer))
             for site in sites]  # fmt: skip
    if _is_ours(model):
        hooks += [block.mlp.register_forward_pre_hook(partial(on_mlp, layer=i))
                  for i, block in enumerate(model.blocks)]  # fmt: skip
    try:
        for ids in batches:
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    mlp_inputs = [torch.cat(inputs[i]) for i in sorted(inputs)] if _is_ours(model) else None
    return mlp_inputs, [torch.cat(active[i]) for i in sorted(active)]


def transplant_patterns(
    patterns: Sequence[Tensor], shape: DecoderShape, seed: int = 0
) -> list[Tensor]:
    """Active-unit patterns for a wider, deeper model: layer l takes the trained layer at the
    same relative depth, each wide unit a fixed random trained unit (a permutation tiled over
    the width), so every token keeps its measured active fraction and co-activation structure."""
    gen = torch.Generator().manual_seed(seed)
    small = len(patterns)
    out = []
    for layer in range(shape.n_layers):
        source = patterns[min(small - 1, layer * small // shape.n_layers)]
        d_small = source.shape[1]
        order = torch.cat([torch.randperm(d_small, generator=gen)
                           for _ in range(-(-shape.d_ff // d_small))])[: shape.d_ff]  # fmt: skip
        out.append(source[:, order])
    return out


@torch.no_grad()
def transplant(
    shape: DecoderShape, active: Sequence[float], seed: int = 0, activation: str = "relu"
) -> Transformer:
    """Our Transformer at ``shape`` (GPT-2 conventions, ``activation`` relu or reglu, random
    weights) whose layer l has its units active for ``active[l * len(active) // n_layers]`` of
    the tokens: each up projection's (gate's) bias is shifted, layer by layer in one pass over
    random tokens, to that quantile of its pre-activations."""
    cfg = ModelConfig(n_layers=shape.n_layers, d_model=shape.d_model, n_heads=shape.n_heads,
                      d_ff=shape.d_ff, activation=activation, style="gpt2",
                      vocab_size=shape.vocab_size, seq_len=shape.seq_len)  # fmt: skip
    with torch.random.fork_rng():  # the caller's random state stays as it was
        torch.manual_seed(seed)
        model = Transformer(cfg).eval()
        ids = torch.randint(0, shape.vocab_size, (2, 64))
    x = model.tok_emb(ids) + model.pos_emb(torch.arange(ids.shape[1]))
    for layer, block in enumerate(model.blocks):
        target = active[layer * len(active) // shape.n_layers]
        x = x + block.attn(block.ln_attn(x), None, None)
        pre = block.mlp.w_in(block.ln_mlp(x))[..., : shape.d_ff].flatten()  # (the gate)
        block.mlp.w_in.bias[: shape.d_ff] -= torch.quantile(
            pre[:: max(1, pre.numel() // 1_000_000)], 1.0 - target
        )
        x = x + block.mlp(block.ln_mlp(x), False)[0]
    return model
