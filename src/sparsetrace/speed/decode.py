"""Models for the speed measurement: sparse MLPs swapped in, batch-1 decoding with a KV cache,
activation patterns, and larger shapes with a measured sparsity transplanted.

:func:`sparsify` replaces, for every MLP that :func:`sparsetrace.sites.locate` finds (ours,
GPT-2, OPT, GPT-NeoX, Llama families), either the whole MLP by a :class:`SparseMlp` (our
ReLU-family models; Llama-family models with a ReLU gate) or its down projection by a
:class:`SparseDown` (and our models' up projection by a :class:`SparseUp` or
:class:`DenseGemv`); the model's own forward then runs the sparse path.
:func:`decode_seconds` times greedy decoding of new tokens, one at a time, after a prompt
(prefill not timed), for our Transformer (its ``KVCache``) and for Hugging Face causal LMs
(``past_key_values``).

A shape where batch-1 decoding is memory-bound (GPT-2-medium: 24 x 2 x 16 MiB of MLP weights) is
built from random weights (:func:`transplant`): our Transformer at that shape, GPT-2
conventions, with each layer's up-projection bias shifted so that the layer's units are active
for the fraction of tokens measured in a trained model (its layer at the same relative depth).
The sparsity is the trained model's; the weights are not — outputs say so.
"""

from __future__ import annotations

import inspect
import math
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
from sparsetrace.speed.sparse_up import SparseMlp, SparseUp

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
    """Swap the model's MLPs (or their projections) for sparse ones, in place; returns the
    SparseDowns in layer order (every down projection becomes one).

    ``taus``: each layer's CETT threshold; required unless the activation is ReLU (exact). Our
    ReLU-family models' MLPs become :class:`OurSparseMlp`s (one fused kernel per layer: up
    projection gate-sparse for ReGLU, screened with ``up="screen"``, else read in full; then the
    active units' rows of W_out), as do Llama-family models with a ReLU gate
    (:class:`SparseMlp`). Elsewhere the down projection becomes a :class:`SparseDown` and our
    plain models' up projection a :class:`DenseGemv` (the sparse paths' kernel family). The
    fused form needs the numba kernel and no thresholds; with ``kernel="embedding_bag"`` our
    models' up projections become :class:`SparseUp`s (gated or screened) or DenseGemvs.
    ``up="screen"``: the int8 screen first (``margin`` < 1: inexact)."""
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
    fused = _fused(model, taus, kernel)
    if fused:  # every refusal before anything is swapped
        biases = [_masked_bias(block.mlp) for block in model.blocks]
    gated, llama_relu = activation == "reglu", _llama_relu(model)
    swapped = []
    for site in sites:
        tau = None if taus is None else float(taus[site.layer])
        down = SparseDown.from_module(site.module, tau=tau, kernel=kernel, **options)
        mlp_path = site.path.rpartition(".")[0]
        mlp = model.get_submodule(mlp_path)
        if llama_relu:  # the whole MLP: its up projection is skipped by the gate too
            _set_module(model, mlp_path, SparseMlp.llama(mlp, down, **options))
        elif fused:
            sparse_up = SparseUp(mlp.w_in.weight, biases[site.layer], gated=gated,
                                 screen=up == "screen", margin=margin, **options)  # fmt: skip
            _set_module(model, mlp_path, OurSparseMlp(sparse_up, down, activation == "relu2"))
        else:
            _set_module(model, site.path, down)
        swapped.append(down)
    if _is_ours(model) and not fused:
        for block in model.blocks:
            if gated or up == "screen":
                block.mlp.w_in = SparseUp.from_module(block.mlp.w_in, gated=gated,
                                                      screen=up == "screen", margin=margin,
                                                      **options)  # fmt: skip
            else:  # read in full, on the sparse paths' kernel family (DenseGemv's why)
                block.mlp.w_in = DenseGemv.from_module(block.mlp.w_in, **options)
    return swapped


class OurSparseMlp(SparseMlp):
    """A :class:`SparseMlp` in our Transformer's MLP slot: ``forward(x, measure)`` returns the
    output and, when measuring, each unit's count of nonzero activations over the positions
    (as ``MLP.forward`` does). A ``unit_mask`` is the one set when it was built (folded into the
    bias: :func:`_masked_bias`); set a new mask, then sparsify anew."""

    def forward(self, x: Tensor, measure: bool = False) -> tuple[Tensor, Tensor | None]:
        if not measure:
            return super().forward(x), None
        h, y = self.hidden_and_output(x)
        return y, (h != 0).sum(dim=-2, dtype=torch.int32)


def _masked_bias(mlp: nn.Module) -> Tensor:
    """Our MLP's ``w_in`` bias (zeros if it has none) with the units its 0/1 ``unit_mask``
    switches off set to -inf in the first half: ReLU(-inf) = 0, so they are never active, never
    read, and the fused path keeps the mask that ``MLP.forward`` applies."""
    w_in = mlp.w_in
    bias = torch.zeros(w_in.out_features) if w_in.bias is None else w_in.bias.detach().clone()
    if mlp.masked:
        mask = mlp.unit_mask
        if ((mask != 0) & (mask != 1)).any():
            raise UserError("the sparse path takes 0/1 unit masks only (the masking experiment's)")
        bias[: mask.numel()][mask == 0] = -math.inf
    return bias


def _fused(model: nn.Module, taus: Sequence[float] | None, kernel: str) -> bool:
    """Our ReLU-family model's MLPs run fused (:class:`OurSparseMlp`): exact zeros, numba."""
    return (_is_ours(model) and activation_of(model) in RELU and taus is None
            and kernel == "numba")  # fmt: skip


def sparse_ups(model: nn.Module) -> list[SparseUp]:
    """The model's SparseUps in layer order (none: its up projections are dense)."""
    return [m for m in model.modules() if isinstance(m, SparseUp)]


def _llama_relu(model: nn.Module) -> bool:
    """A transformers model whose MLPs are Llama's gated form with a ReLU gate."""
    architecture, sites = locate(model)
    if architecture != "llama" or activation_of(model) != "relu":
        return False
    return hasattr(model.get_submodule(sites[0].path.rpartition(".")[0]), "up_proj")


def mlp_paths(model: nn.Module, fused: bool = False) -> list[str]:
    """The modules :func:`sparsify` may swap: down projections, and our models' up
    projections; whole MLPs where it fuses them (``fused``: our ReLU-family models, see
    :func:`_fused`; Llama-family ReLU models always)."""
    paths = [site.path for site in locate(model)[1]]
    if _llama_relu(model) or fused:
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
    """A model whose modules at ``paths`` switch between the dense modules and the modules
    that replace them (``downs``, ``ups``: the SparseDowns and SparseUps among them, if any).
    Built by :meth:`sparse` (the sparse paths of :func:`sparsify`) or :meth:`gemv`. Each path's
    parent module is fixed when the swap is made, so swaps of nested paths (whole MLPs; their
    projections) stay independent: one never writes into a module another put in place."""

    model: nn.Module
    paths: list[str]
    dense: list[nn.Module]
    modules: list[nn.Module]
    downs: list[SparseDown] = field(default_factory=list)
    ups: list[SparseUp] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.slots = [(self.model.get_submodule(parent) if parent else self.model, name)
                      for parent, _, name in (p.rpartition(".") for p in self.paths)]  # fmt: skip

    @classmethod
    def sparse(
        cls, model: nn.Module, taus: Sequence[float] | None, kernel: str, up: str = "dense",
        margin: float = 1.0, max_rows: int | None = None,
    ) -> Swap:  # fmt: skip
        """:func:`sparsify` ``model``; returned dense (``use(sparse=True)`` switches)."""
        paths = mlp_paths(model, _fused(model, taus, kernel))
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
        for (parent, name), module in zip(self.slots, self.modules if sparse else self.dense,
                                          strict=True):  # fmt: skip
            setattr(parent, name, module)
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
