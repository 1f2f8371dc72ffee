"""The ``sparsetrace speed`` measurement: how much faster a model's MLP sparsity makes batch-1
decoding here, against the memory-bandwidth bound measured in the same run (docs/speed.md)."""

from __future__ import annotations

import json
import math
import platform
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pandas as pd
import torch

from sparsetrace.errors import UserError
from sparsetrace.model.transformer import GATED, Transformer
from sparsetrace.sites import locate
from sparsetrace.speed import decode as dec
from sparsetrace.speed import measure as ms

DEAD_TOKENS = 8192  # validation tokens that decide which units are dead (alive: >= 9 of them)
SCREEN_TOKENS = 4096  # validation tokens of the int8 screen's recall and perplexity cost
SCREEN_MARGINS = (1.0, 0.5, 0.25, 0.0)  # 1: the whole error bound (exact); 0: the int8 sign
PPL_BUDGET = 1.01  # an inexact screen is timed at the smallest margin costing <= 1 % perplexity


def _fractions(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--fractions: numbers in (0, 1] like 0.1,0.05; got {text!r}") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise UserError(f"--fractions: numbers in (0, 1] like 0.1,0.05; got {text!r}")
    return values


def _taus(run: Path, activation: str, step: int) -> list[float] | None:
    """Each layer's CETT threshold from the run's PPL-p% measurement of checkpoint ``step`` (the
    one loaded); None for ReLU-like activations (exact zeros)."""
    if activation in dec.RELU:
        return None
    summary = run / "sparsing_law.json"
    how = f"run `sparsetrace sparsing-law {run} --final-only` first"
    if not summary.is_file():
        raise UserError(f"{run}: the {activation} MLP's sparse path needs CETT thresholds; {how}")
    try:
        last = json.loads(summary.read_text())["checkpoints"][-1]
        taus = [float(last["layers"][k]["tau"]) for k in sorted(last["layers"], key=int)]
        measured = int(last["step"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise UserError(f"{summary}: not a sparsing-law summary with thresholds; {how}") from None
    if measured != step:
        raise UserError(f"{summary}: thresholds of step {measured}, but the latest checkpoint is "
                        f"step {step}; {how}")  # fmt: skip
    return taus


def _cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decoding step reads: every parameter once (a tied head once: it is
    read in full for the logits), but one row of each embedding table that no linear layer
    shares (untied token embeddings, position tables). KV-cache reads are not counted."""
    shared = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding) and id(m.weight) not in shared:
            w = m.weight
            total -= (w.shape[0] - 1) * w.shape[1] * w.element_size()
    return total


@dataclass(frozen=True)
class Variant:
    """A model to decode sparse: its label, its dense/sparse swap, the bytes a dense step reads
    and each layer's W_out bytes (the part the sparse path reads only for active units)."""

    label: str
    swap: dec.Swap
    nbytes: int
    down_bytes: list[int]

    @classmethod
    def of(cls, label: str, model: torch.nn.Module, taus: list[float] | None, kernel: str,
           up: str = "dense", margin: float = 1.0) -> Variant:  # fmt: skip
        nbytes = _bytes(model)  # with the dense modules in place
        downs = [site.module.weight for site in locate(model)[1]]
        return cls(label, dec.Swap.sparse(model, taus, kernel, up, margin), nbytes,
                   [w.numel() * w.element_size() for w in downs])  # fmt: skip

    def sparse_bytes(self) -> float:
        """Bytes a sparse step reads at what its sparse modules counted: the inactive rows of
        each W_out left out, each SparseUp's reads instead of its whole weight."""
        fractions = [down.read_fraction for down in self.swap.downs]
        skipped = sum((1 - a) * b for a, b in zip(fractions, self.down_bytes, strict=True))
        skipped += sum(u.dense_bytes - u.bytes_per_token for u in self.swap.ups)
        return self.nbytes - skipped


def _decode_rows(
    variants: list[Variant], prompt: torch.Tensor, new_tokens: int, repeats: int,
    bandwidth: float,
) -> list[dict]:  # fmt: skip
    """Decoding speed of each sparse variant against the dense reference (the first variant's
    model with its dense projections; for our models also with its MLP projections on the numba
    GEMV, and the speed-up is over the faster), timed interleaved, and against the bounds. The
    units read per token are counted in an untimed sparse run first, on the same tokens."""
    reference = variants[0].swap
    read, active = [], []
    for v in variants:  # count what one decoding step reads: the prefill runs dense here
        modules = v.swap.downs + v.swap.ups
        limits = [module.max_rows for module in modules]
        for module in modules:
            module.reset_counts()
            module.max_rows = 1
        dec.decode(v.swap.use(sparse=True), prompt, new_tokens)
        for module, limit in zip(modules, limits, strict=True):
            module.max_rows = limit
        read.append(v.sparse_bytes())
        active.append(sum(d.read_fraction for d in v.swap.downs) / len(v.swap.downs))
    # Our models: every linear layer on the numba GEMV, for the dense baseline and beneath each
    # sparse variant's MLPs alike; others: torch's layers beneath both.
    fast = {id(v.swap.model): dec.Swap.gemv(v.swap.use(sparse=False), everywhere=True)
            for v in variants if isinstance(v.swap.model, Transformer)}  # fmt: skip

    def decode(swap: dec.Swap, sparse: bool, n: int) -> object:
        beneath = fast.get(id(swap.model))
        if beneath is not None:
            beneath.use(sparse=sparse)
        if swap is not beneath:
            swap.use(sparse=sparse)
        return dec.decode(swap.model, prompt, n)

    runs = {"dense": partial(decode, reference, False)}
    if id(reference.model) in fast:
        runs[ms.GEMV] = partial(decode, fast[id(reference.model)], True)
    for v in variants:
        runs[v.label] = partial(decode, v.swap, True)
    try:
        seconds = dec.decode_seconds(runs, new_tokens, repeats)
    finally:
        for swap in [v.swap for v in variants] + list(fast.values()):
            swap.use(sparse=False)
    dense, total = seconds["dense"], variants[0].nbytes
    best = min(dense, seconds.get(ms.GEMV, dense))
    return [{"model": v.label, "dense tok/s": 1 / dense,
             "dense GEMV tok/s": 1 / seconds[ms.GEMV] if ms.GEMV in seconds else math.nan,
             "sparse tok/s": 1 / seconds[v.label], "speed-up": best / seconds[v.label],
             "speed-up vs torch": dense / seconds[v.label], "bound speed-up": total / r,
             "dense of bound": total / bandwidth / best,
             "sparse of bound": r / bandwidth / seconds[v.label],
             "active fraction (decode)": a,
             "MB per token (dense)": total / 1e6, "MB per token (sparse)": r / 1e6}
            for v, r, a in zip(variants, read, active, strict=True)]  # fmt: skip


def _sweep(
    layers: list[ms.MlpLayer], inputs: list[torch.Tensor], fractions: list[float],
    bandwidth: float, repeats: int, label: str, measured: list[torch.Tensor] | None = None,
) -> list[dict]:  # fmt: skip
    """MLP-block rows: at the measured patterns (if given), then at each random fraction."""
    rows = []
    tokens = inputs[0].shape[0]
    if measured is not None:
        t = ms.time_mlp_block(layers, inputs, [m.float() for m in measured], bandwidth, repeats)
        rows.append({"shape": label, "pattern": "measured", **t.row()})
    widths = [layer.down.shape[1] for layer in layers]
    for a in fractions:
        masks = ms.random_masks(tokens, widths, a)
        t = ms.time_mlp_block(layers, inputs, masks, bandwidth, repeats)
        rows.append({"shape": label, "pattern": "random", **t.row()})
    return rows


def _mean_loss(model: torch.nn.Module, batches: list) -> float:
    """Mean next-token cross-entropy per target over validation batches."""
    from sparsetrace.sparsing.search import causal_lm_loss

    with torch.no_grad():
        total = sum(float(causal_lm_loss(model, b).sum()) for b in batches)
    return total / sum(b.n_targets for b in batches)


def _validation(cfg, tokens: int) -> list:
    from sparsetrace.data.prepare import prepare_data
    from sparsetrace.sparsing.source import validation_batches

    return validation_batches(prepare_data(cfg.data).val, cfg.data.seq_len, tokens)


def _screen_quality(model: torch.nn.Module, cfg, kernel: str) -> list[dict]:
    """The int8 screen as a predictor, per margin (1: exact; < 1: the error bound shrunk), on
    SCREEN_TOKENS validation tokens: the fraction of units it leaves as candidates, its recall
    of the units active in the dense model (nonzero at the down projection), and the perplexity of
    the screened model (every token through the sparse path) over the dense one."""
    batches = _validation(cfg, SCREEN_TOKENS)
    inputs, actives = dec.active_patterns(model, [b.inputs for b in batches])
    dense = _mean_loss(model, batches)
    rows = []
    for margin in SCREEN_MARGINS:
        swap = dec.Swap.sparse(model, None, kernel, "screen", margin, max_rows=1 << 30)
        kept = [up.candidates(x) for up, x in zip(swap.ups, inputs, strict=True)]
        candidates = sum(float(k.float().mean()) for k in kept) / len(kept)
        loss = _mean_loss(swap.use(sparse=True), batches)
        swap.use(sparse=False)
        rows.append({"margin": margin, "candidate fraction": candidates,
                     "recall": _kept_share(kept, actives),
                     "ppl ratio": math.exp(loss - dense)})  # fmt: skip
    return rows


def _recall(swap: dec.Swap, inputs: list[torch.Tensor], active: list[torch.Tensor]) -> float:
    """Of the units active in the dense model (``active[l]``: (tokens, d_ff) at the MLP inputs
    ``inputs[l]``), the fraction that the swap's int8 screens keep as candidates (nan: no
    screen, or no active unit)."""
    if not any(up.screen for up in swap.ups):
        return math.nan
    kept = [up.candidates(x) for up, x in zip(swap.ups, inputs, strict=True)]
    return _kept_share(kept, active)


def _kept_share(kept: list[torch.Tensor], active: list[torch.Tensor]) -> float:
    hit = sum(int((k & on).sum()) for k, on in zip(kept, active, strict=True))
    total = sum(int(on.sum()) for on in active)
    return hit / total if total else math.nan


def _prune_dead(model, cfg, taus: list[float] | None) -> tuple[torch.nn.Module, dict]:
    """A copy of ``model`` without its dead units (Sparsing Law: active on fewer than 0.1 % of
    the validation tokens, here DEAD_TOKENS of them) in W_in and W_out, and what it cost:
    units removed per layer, the pruned model's perplexity over the dense one on those tokens,
    its active fraction per layer (of its own units) and thresholds."""
    from sparsetrace.experiments.prune import prune_model
    from sparsetrace.sparsing.cett import DEAD_FRACTION

    batches = _validation(cfg, DEAD_TOKENS)
    _, active = dec.active_patterns(model, [b.inputs for b in batches], taus)
    names = list(model.mlps())
    keep = {name: a.float().mean(0) >= DEAD_FRACTION for name, a in zip(names, active, strict=True)}
    pruned = prune_model(model, cfg, keep).float().eval()
    _, after = dec.active_patterns(pruned, [b.inputs for b in batches], taus)
    return pruned, {
        "dead_tokens": sum(b.inputs.numel() for b in batches),
        "removed": [int((~k).sum()) for k in keep.values()],
        "width": [int(k.numel()) for k in keep.values()],
        "ppl_ratio": math.exp(_mean_loss(pruned, batches) - _mean_loss(model, batches)),
        "active": [float(a.float().mean()) for a in after], "taus": taus,
    }  # fmt: skip


@dataclass
class SpeedModel:
    """The model measured: ours (a run directory) or a Hugging Face causal LM (a model
    directory), its thresholds (None: exact ReLU zeros), token ids to measure and decode on, and
    its longest context."""

    model: torch.nn.Module
    activation: str
    taus: list[float] | None
    ids: torch.Tensor  # (1, tokens + 16)
    context: int
    cfg: object | None = None  # our RunConfig (dead-unit pruning needs it)


def _subject(source: Path, tokens: int, prune_dead: bool) -> SpeedModel:
    need = tokens + 16
    if (source / "config.yaml").is_file():
        from sparsetrace.checkpoint import checkpoint_step, list_checkpoints, load_trained_model
        from sparsetrace.data.prepare import prepare_data

        model, cfg = load_trained_model(source)
        step = checkpoint_step(list_checkpoints(source)[-1])
        if cfg.model.activation in GATED and cfg.model.activation not in dec.RELU:
            raise UserError(
                f"{cfg.model.activation}: the speed measurement covers plain MLPs (relu, gelu, "
                "silu, relu2) and ReGLU; other gated MLPs are not supported yet"
            )
        val = prepare_data(cfg.data).val[:need].astype("int64")
        if len(val) < need:
            raise UserError(f"--tokens {tokens}: the validation split has {len(val)} tokens")
        return SpeedModel(model.float(), cfg.model.activation,
                       _taus(source, cfg.model.activation, step), torch.as_tensor(val)[None],
                       cfg.data.seq_len, cfg)  # fmt: skip
    if (source / "config.json").is_file():
        if prune_dead:
            raise UserError("--prune-dead needs a sparsetrace run (its pruning slices our "
                            "model's layout); not a Hugging Face model")  # fmt: skip
        from transformers import AutoConfig, AutoModelForCausalLM

        from sparsetrace.series import from_pretrained, load_tokenizer, token_batches
        from sparsetrace.sites import config_activation, config_context

        config = from_pretrained("config", AutoConfig, str(source), None, True)
        activation = config_activation(config)  # checked before the weights are read
        if activation not in dec.RELU:
            raise UserError(f"{source}: the MLP activation is {activation}; for Hugging Face "
                            "models the speed measurement needs a ReLU MLP (OPT, ReLU GPT-2): "
                            "CETT thresholds are computed for sparsetrace runs only")  # fmt: skip
        model = from_pretrained("model", AutoModelForCausalLM, str(source), None, True)
        ids, _ = token_batches("embedded", load_tokenizer(str(source), None, True), 1, 1, need)
        context = config_context(model.config) or need
        return SpeedModel(model.float().eval(), activation, None, ids[0], int(context))
    raise UserError(f"{source}: neither a sparsetrace run (config.yaml) nor a Hugging Face model "
                    "directory (config.json)")  # fmt: skip


def _inexact_margin(quality: list[dict] | None) -> float | None:
    """The smallest margin below 1 whose screened model kept the perplexity within
    PPL_BUDGET on the validation tokens (None: no screen, or none within it)."""
    within = [row["margin"] for row in quality or []
              if row["margin"] < 1 and row["ppl ratio"] <= PPL_BUDGET]  # fmt: skip
    return min(within) if within else None


def _ups(activation: str, inexact: float | None = None) -> list[tuple[str, float]]:
    """The up-projection paths measured, (path, margin): ``dense`` (read in full; gate-sparse
    for ReGLU) and, for ReLU-family MLPs, the exact int8 ``screen`` and, if given, the screen at
    the ``inexact`` margin."""
    if activation not in dec.RELU:
        return [("dense", 1.0)]
    return [("dense", 1.0), ("screen", 1.0)] + ([] if inexact is None else [("screen", inexact)])


def _screen(up: str, margin: float) -> str:
    """The name of an up-projection path's screen ("" for none)."""
    if up == "dense":
        return ""
    return "int8 screen" if margin == 1 else f"int8 screen at margin {margin:g}"


def _path(activation: str, up: str, margin: float = 1.0) -> str:
    rows = "W_up + W_out rows" if activation == "reglu" else "W_out rows"
    return f"{_screen(up, margin)}, {rows}" if up != "dense" else rows


def _variants(label: str, model: torch.nn.Module, taus: list[float] | None, kernel: str,
              activation: str, inexact: float | None = None) -> list[Variant]:  # fmt: skip
    return [Variant.of(f"{label}, {_screen(up, m)}" if up != "dense" else label, model, taus,
                       kernel, up, m) for up, m in _ups(activation, inexact)]  # fmt: skip


def _path_rows(
    label: str, pattern: str, model: torch.nn.Module, variants: list[Variant], activation: str,
    inputs: list[torch.Tensor], active: list[torch.Tensor], bandwidth: float, repeats: int,
    inexact: float | None = None,
) -> list[dict]:  # fmt: skip
    """MLP-block rows of each variant's sparse modules on our model's real MLPs, with the
    recall of the screened paths on the same tokens (``active``: the dense model's units)."""
    paths = [_path(activation, up, margin) for up, margin in _ups(activation, inexact)]
    swaps = {path: v.swap for path, v in zip(paths, variants, strict=True)}
    timings = ms.time_mlp_paths(model, inputs, swaps, bandwidth, repeats)
    return [{"shape": label, "pattern": pattern, **t.row(),
             "recall": _recall(swaps[t.path], inputs, active)} for t in timings]  # fmt: skip


def _big_shape(
    shape: str, big: dec.DecoderShape, activation: str, fractions: list[float], tokens: int,
    new_tokens: int, repeats: int, kernel: str, bandwidth: float, inexact: float | None,
) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """Block and decoding rows of random weights at ``big`` with ``fractions`` transplanted."""
    model = dec.transplant(big, fractions, activation=activation)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, big.vocab_size, (1, max(tokens, 16)), generator=gen)
    label = f"{shape} {activation}"
    variants = _variants(f"{label} (random weights, transplanted sparsity)", model, None, kernel,
                         activation, inexact)  # fmt: skip
    inputs, active = dec.active_patterns(model, [ids[:, :tokens]])
    block = _path_rows(label, "transplanted fraction", model, variants, activation, inputs,
                       active, bandwidth, repeats, inexact)  # fmt: skip
    decode = _decode_rows(variants, ids[:, :16], new_tokens, repeats, bandwidth)
    return block, decode


def run_speed(
    run: Path, shape: str, fractions: str, tokens: int, new_tokens: int, repeats: int,
    kernel: str, prune_dead: bool, out: Path | None,
) -> Path:  # fmt: skip
    """Measure, print and write speed.json + tables + the report; returns the report's index."""
    run, big, points = Path(run), dec.parse_shape(shape), _fractions(fractions)
    if tokens < 1 or new_tokens < 1 or repeats < 1:
        raise UserError("--tokens, --new-tokens and --repeats must be >= 1")
    s = _subject(run, tokens, prune_dead)
    context = min(s.context, big.seq_len)
    if tokens > s.context:
        raise UserError(f"--tokens {tokens}: the model reads at most {s.context} positions")
    if new_tokens + 16 >= context:
        raise UserError(f"--new-tokens {new_tokens}: with the 16-token prompt it must stay below "
                        f"{context} positions (the model's and the shape's)")  # fmt: skip
    model, taus = s.model, s.taus
    inputs, active = dec.active_patterns(model, [s.ids[:, :tokens]], taus)
    fraction_by_layer = [float(a.float().mean()) for a in active]
    bandwidth = ms.read_bandwidth()
    by_layer = ", ".join(f"{a:.3f}" for a in fraction_by_layer)
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s; {s.activation} model, units active per "
          f"token by layer {by_layer}", flush=True)  # fmt: skip
    ours = inputs is not None  # our model: its own MLPs timed too
    screen = ours and s.activation in dec.RELU  # the int8 screen: our ReLU-family models
    quality = _screen_quality(model, s.cfg, kernel) if screen else None
    inexact = _inexact_margin(quality)
    block = []
    if ours and s.activation not in GATED:  # W_out rows at exact random fractions
        own = [ms.MlpLayer.of(b.mlp.w_in.weight, b.mlp.w_out.weight, kernel)
               for b in model.blocks]  # fmt: skip
        block = _sweep(own, inputs, points, bandwidth, repeats, "model")
    prompt = s.ids[:, :16]
    extra = []
    if prune_dead:  # first, while the model is dense: the pruned copy takes its weights
        pruned, pruning = _prune_dead(model, s.cfg, taus)
        extra.append(Variant.of("model, dead units pruned", pruned, pruning["taus"], kernel))
    variants = (_variants("model", model, taus, kernel, s.activation, inexact) if ours
                else [Variant.of("model", model, taus, kernel)])  # fmt: skip
    if ours:
        block = _path_rows("model", "measured", model, variants, s.activation, inputs, active,
                           bandwidth, repeats, inexact) + block  # fmt: skip
    decode = _decode_rows(variants + extra, prompt, new_tokens, repeats, bandwidth)
    del variants, extra
    # The memory-bound shape: random weights, this model's measured patterns and sparsity.
    wide = dec.transplant_patterns(active, big)
    gen = torch.Generator().manual_seed(0)
    big_inputs = [torch.randn(tokens, big.d_model, generator=gen) for _ in range(big.n_layers)]
    big_layers = ms.random_layers(big.d_model, big.d_ff, big.n_layers, kernel)
    block += _sweep(big_layers, big_inputs, points, bandwidth, repeats, shape, wide)
    big_layers.clear()  # free the sweep's weights before the decoding models are built
    for activation in ("relu", "reglu"):  # a plain and a gated ReLU MLP at the shape
        rows, decoded = _big_shape(shape, big, activation, fraction_by_layer, tokens, new_tokens,
                                   repeats, kernel, bandwidth, inexact)  # fmt: skip
        block += rows
        decode += decoded
    bandwidth_end = ms.read_bandwidth()  # the machine drifts: say by how much
    if bandwidth_end > bandwidth:  # a bound takes the faster read seen: rescale "of bound"
        for row in block + decode:
            for key in ("sparse of bound", "dense of bound"):
                row[key] *= bandwidth / bandwidth_end
    from sparsetrace.report.speed import write_speed_report

    out = Path(out) if out else run / "speed"
    result = {
        "run": str(run), "machine": _cpu_name(),
        "threads": torch.get_num_threads(), "bandwidth_GBps": bandwidth / 1e9,
        "bandwidth_end_GBps": bandwidth_end / 1e9, "kernel": kernel,
        "activation": s.activation, "thresholds": taus,
        "active_by_layer": fraction_by_layer, "shape": shape,
        "pruning": pruning if prune_dead else None, "screen": quality,
        "inexact_margin": inexact, "ppl_budget": PPL_BUDGET,
        "block": block, "decode": decode,
    }  # fmt: skip
    return write_speed_report(out, result)


def print_summary(index: Path) -> None:
    result = json.loads((index.parent.parent / "speed.json").read_text())
    frame = pd.DataFrame(result["block"])
    cols = ["shape", "pattern", "path", "active fraction", "candidate fraction", "recall",
            "dense (us)", "dense GEMV (us)", "sparse (us)", "speed-up", "speed-up vs torch",
            "bound speed-up", "sparse of bound"]  # fmt: skip
    print(frame.reindex(columns=cols).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if result["screen"]:
        print(
            pd.DataFrame(result["screen"]).to_string(index=False, float_format=lambda v: f"{v:.4f}")
        )
    print(pd.DataFrame(result["decode"]).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
