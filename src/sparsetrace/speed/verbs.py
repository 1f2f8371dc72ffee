"""``sparsetrace speed``: how much faster a model's MLP sparsity makes batch-1 decoding here,
against the memory-bandwidth bound measured in the same run (docs/speed.md)."""

from __future__ import annotations

import json
import math
import platform
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from sparsetrace.errors import UserError
from sparsetrace.model.transformer import GATED
from sparsetrace.speed import decode as dec
from sparsetrace.speed import measure as ms

DEFAULT_FRACTIONS = "1,0.5,0.2,0.1,0.05,0.02"
DEAD_TOKENS = 8192  # validation tokens that decide which units are dead (0.1 %: 8 tokens)


def _fractions(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--fractions: numbers in (0, 1] like 0.1,0.05; got {text!r}") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise UserError(f"--fractions: numbers in (0, 1] like 0.1,0.05; got {text!r}")
    return values


def _taus(run: Path, activation: str) -> list[float] | None:
    """Each layer's CETT threshold at the run's last PPL-p% measurement (None for ReLU)."""
    if activation in dec.RELU:
        return None
    summary = run / "sparsing_law.json"
    if not summary.is_file():
        raise UserError(f"{run}: the {activation} MLP's sparse path needs CETT thresholds; run "
                        f"`sparsetrace sparsing-law {run} --final-only` first")  # fmt: skip
    last = json.loads(summary.read_text())["checkpoints"][-1]["layers"]
    return [float(last[k]["tau"]) for k in sorted(last, key=int)]


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
    """Bytes of the parameters a decoding step reads (every weight once; a tied head once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


@dataclass(frozen=True)
class Variant:
    """A sparse model to decode with: its label, the model, and the bytes a token reads at the
    measured ``active`` fraction per layer (every weight once, less the inactive rows of each
    W_out)."""

    label: str
    swap: dec.Swap
    nbytes: float

    @classmethod
    def of(cls, label: str, model: torch.nn.Module, taus: list[float] | None, kernel: str,
           active: list[float]) -> Variant:  # fmt: skip
        downs = [site.module for site in dec.locate(model)[1]]
        saved = sum((1 - a) * d.weight.numel() * d.weight.element_size()
                    for a, d in zip(active, downs, strict=True))  # fmt: skip
        return cls(label, dec.Swap(model, taus, kernel), _bytes(model) - saved)


def _decode_rows(
    variants: list[Variant], prompt: torch.Tensor, new_tokens: int, repeats: int,
    bandwidth: float,
) -> list[dict]:  # fmt: skip
    """Decoding speed of each sparse variant against the dense reference (the first variant's
    model with its dense projections), timed interleaved, and both against their bounds."""
    reference = variants[0].swap
    total = _bytes(reference.use(sparse=False))  # SparseDown holds buffers, not parameters

    def dense_run(n: int) -> object:
        return dec.decode(reference.use(sparse=False), prompt, n)

    runs = {"dense": dense_run}
    for v in variants:
        runs[v.label] = lambda n, v=v: dec.decode(v.swap.use(sparse=True), prompt, n)
    seconds = dec.decode_seconds(runs, new_tokens, repeats)
    return [{"model": v.label, "dense tok/s": 1 / seconds["dense"],
             "sparse tok/s": 1 / seconds[v.label],
             "speed-up": seconds["dense"] / seconds[v.label], "bound speed-up": total / v.nbytes,
             "dense of bound": total / bandwidth / seconds["dense"],
             "sparse of bound": v.nbytes / bandwidth / seconds[v.label],
             "MB per token (dense)": total / 1e6, "MB per token (sparse)": v.nbytes / 1e6}
            for v in variants]  # fmt: skip


def _sweep(layers, inputs, fractions, bandwidth, repeats, label, measured=None) -> list[dict]:
    rows = []
    n, d_ff = len(layers), layers[0].down.shape[1]
    tokens = inputs[0].shape[0]
    if measured is not None:
        t = ms.time_mlp_block(layers, inputs, [m.float() for m in measured], bandwidth, repeats)
        rows.append({"shape": label, "pattern": "measured", **t.row()})
    for a in fractions:
        masks = ms.random_masks(tokens, d_ff, a, n)
        t = ms.time_mlp_block(layers, inputs, masks, bandwidth, repeats)
        rows.append({"shape": label, "pattern": "random", **t.row()})
    return rows


def _prune_dead(model, cfg, taus: list[float] | None) -> tuple[torch.nn.Module, dict]:
    """A copy of ``model`` without its dead units (Sparsing Law: active on fewer than 0.1 % of
    the validation tokens, here DEAD_TOKENS of them) in W_in and W_out, and what it cost:
    units removed per layer, the pruned model's perplexity over the dense one on those tokens,
    its active fraction per layer (of its own units) and thresholds."""
    from sparsetrace.data.prepare import prepare_data
    from sparsetrace.experiments.prune import prune_model
    from sparsetrace.sparsing.cett import DEAD_FRACTION
    from sparsetrace.sparsing.over_training import validation_batches

    batches = validation_batches(prepare_data(cfg.data).val, cfg.data.seq_len, DEAD_TOKENS)
    _, active = dec.active_patterns(model, [b.inputs for b in batches], taus)
    names = list(model.mlps())
    keep = {name: a.float().mean(0) >= DEAD_FRACTION for name, a in zip(names, active, strict=True)}
    pruned = prune_model(model, cfg, keep).float().eval()
    with torch.no_grad():
        dense = [float(model(b.inputs, b.targets).loss) for b in batches]
        cut = [float(pruned(b.inputs, b.targets).loss) for b in batches]
    _, after = dec.active_patterns(pruned, [b.inputs for b in batches], taus)
    return pruned, {
        "dead_tokens": DEAD_TOKENS,
        "removed": [int((~k).sum()) for k in keep.values()],
        "width": [int(k.numel()) for k in keep.values()],
        "ppl_ratio": math.exp((sum(cut) - sum(dense)) / len(batches)),
        "active": [float(a.float().mean()) for a in after], "taus": taus,
    }  # fmt: skip


@dataclass
class Subject:
    """The model measured: ours (a run directory) or a Hugging Face causal LM (a model
    directory), its thresholds (None: exact ReLU zeros), token ids to measure and decode on, and
    its longest context."""

    model: torch.nn.Module
    activation: str
    taus: list[float] | None
    ids: torch.Tensor  # (1, tokens + 16)
    context: int
    cfg: object | None = None  # our RunConfig (dead-unit pruning needs it)


def _subject(source: Path, tokens: int) -> Subject:
    need = tokens + 16
    if (source / "config.yaml").is_file():
        from sparsetrace.data.prepare import prepare_data
        from sparsetrace.train.checkpoint import load_trained_model

        model, cfg = load_trained_model(source)
        if cfg.model.activation in GATED:
            raise UserError(
                f"{cfg.model.activation}: the speed measurement covers plain MLPs (relu, gelu, "
                "silu, relu2); gated MLPs are not supported yet"
            )
        val = prepare_data(cfg.data).val[:need].astype("int64")
        return Subject(model.float(), cfg.model.activation, _taus(source, cfg.model.activation),
                       torch.as_tensor(val)[None], cfg.data.seq_len, cfg)  # fmt: skip
    if (source / "config.json").is_file():
        from transformers import AutoConfig, AutoModelForCausalLM

        from sparsetrace.analysis.analyze import _from_pretrained, _load_tokenizer, token_batches

        config = _from_pretrained("config", AutoConfig, str(source), None, True)
        activation = dec.config_activation(config)  # checked before the weights are read
        if activation not in dec.RELU:
            raise UserError(f"{source}: the MLP activation is {activation}; for Hugging Face "
                            "models the speed measurement needs a ReLU MLP (OPT, ReLU GPT-2): "
                            "CETT thresholds are computed for sparsetrace runs only")  # fmt: skip
        model = _from_pretrained("model", AutoModelForCausalLM, str(source), None, True)
        ids, _ = token_batches("embedded", _load_tokenizer(str(source), None, True), 1, 1, need)
        context = getattr(model.config, "max_position_embeddings", None) or getattr(
            model.config, "n_positions", need)  # fmt: skip
        return Subject(model.float().eval(), activation, None, ids[0], int(context))
    raise UserError(f"{source}: neither a sparsetrace run (config.yaml) nor a Hugging Face model "
                    "directory (config.json)")  # fmt: skip


def run_speed(
    run: Path, shape: str, fractions: str, tokens: int, new_tokens: int, repeats: int,
    kernel: str, prune_dead: bool, out: Path | None,
) -> Path:  # fmt: skip
    """Measure, print and write speed.json + tables + the report; returns the report's index."""
    run, big, points = Path(run), dec.parse_shape(shape), _fractions(fractions)
    if tokens < 1 or new_tokens < 1 or repeats < 1:
        raise UserError("--tokens, --new-tokens and --repeats must be >= 1")
    s = _subject(run, tokens)
    if new_tokens + 1 >= s.context:
        raise UserError(f"--new-tokens must be below the model's {s.context} positions")
    if prune_dead and s.cfg is None:
        raise UserError("--prune-dead needs a sparsetrace run (its pruning keeps the optimizer's "
                        "layout); a Hugging Face model cannot be pruned here")  # fmt: skip
    model, taus = s.model, s.taus
    inputs, active = dec.active_patterns(model, [s.ids[:, :tokens]], taus)
    fraction_by_layer = [float(a.float().mean()) for a in active]
    bandwidth = ms.read_bandwidth()
    by_layer = ", ".join(f"{a:.3f}" for a in fraction_by_layer)
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s; {s.activation} model, units active per "
          f"token by layer {by_layer}", flush=True)  # fmt: skip
    block = []
    if inputs is not None:  # our model: its own MLPs timed too
        own = [ms.MlpLayer.of(b.mlp.w_in.weight, b.mlp.w_out.weight, kernel)
               for b in model.blocks]  # fmt: skip
        block = _sweep(own, inputs, points, bandwidth, repeats, "model", active)
        del own
    prompt = s.ids[:, : min(16, s.context - new_tokens)]
    variants = []
    if prune_dead:  # first, while the model is dense: the pruned copy takes its weights
        pruned, pruning = _prune_dead(model, s.cfg, taus)
        variants.append(Variant.of("model, dead units pruned", pruned, pruning["taus"], kernel,
                                   pruning["active"]))  # fmt: skip
    variants.insert(0, Variant.of("model", model, taus, kernel, fraction_by_layer))
    decode = _decode_rows(variants, prompt, new_tokens, repeats, bandwidth)
    # The memory-bound shape: random weights, this model's measured patterns and sparsity.
    wide = dec.transplant_patterns(active, big)
    gen = torch.Generator().manual_seed(0)
    big_inputs = [torch.randn(tokens, big.d_model, generator=gen) for _ in range(big.n_layers)]
    big_layers = ms.random_layers(big.d_model, big.d_ff, big.n_layers, kernel)
    block += _sweep(big_layers, big_inputs, points, bandwidth, repeats, shape, wide)
    del big_layers
    big_model = dec.transplant(big, fraction_by_layer)
    big_prompt = torch.randint(0, big.vocab_size, (1, 16), generator=gen)
    big_active = [fraction_by_layer[i * len(active) // big.n_layers] for i in range(big.n_layers)]
    big_variant = Variant.of(f"{shape} (random weights, transplanted sparsity)", big_model, None,
                             kernel, big_active)  # fmt: skip
    decode += _decode_rows([big_variant], big_prompt, new_tokens, repeats, bandwidth)
    del big_model
    from sparsetrace.report.speed import write_speed_report

    out = Path(out) if out else run / "speed"
    result = {
        "run": str(run), "machine": _cpu_name(),
        "threads": torch.get_num_threads(), "bandwidth_GBps": bandwidth / 1e9, "kernel": kernel,
        "activation": s.activation, "thresholds": taus,
        "active_by_layer": fraction_by_layer, "shape": shape,
        "pruning": pruning if prune_dead else None,
        "block": block, "decode": decode,
    }  # fmt: skip
    return write_speed_report(out, result)


def print_summary(index: Path) -> None:
    result = json.loads((index.parent.parent / "speed.json").read_text())
    frame = pd.DataFrame(result["block"])
    cols = ["shape", "pattern", "active fraction", "dense (us)", "sparse (us)", "speed-up",
            "bound speed-up", "sparse of bound"]  # fmt: skip
    print(frame[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(pd.DataFrame(result["decode"]).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


def speed(
    run: Path,
    shape: str = "gpt2-medium",
    fractions: str = DEFAULT_FRACTIONS,
    tokens: int = 32,
    new_tokens: int = 32,
    repeats: int = 5,
    kernel: str = "embedding_bag",
    prune_dead: bool = False,
    out: Path | None = None,
) -> None:
    """Measure how much faster the model's MLP sparsity makes batch-1 decoding on this machine.

    Args:
        run: a trained sparsetrace run directory (ReLU: exact; other plain activations use the
            CETT thresholds of its `sparsing-law` measurement)
        shape: the memory-bound shape measured with this model's sparsity transplanted onto
            random weights: gpt2-medium, opt-350m, gpt2-large or d_model,n_layers,n_heads,d_ff
        fractions: active fractions of the MLP-block sweep (random units, exact count)
        tokens: validation tokens whose activation patterns are measured and timed
        new_tokens: tokens decoded per timed generation
        repeats: timings per point (the fastest is kept)
        kernel: sparse down projection: embedding_bag (threads over column blocks) or numba
            (one compiled single-threaded loop)
        prune_dead: also decode with the dead units (active on < 0.1 % of 8,192 validation
            tokens) removed from both projections, then sparse
        out: output directory (default: RUN/speed)
    """
    from sparsetrace.speed.sparse_down import KERNELS

    if kernel not in KERNELS:
        raise UserError(f"--kernel must be one of {', '.join(KERNELS)}; got {kernel!r}")
    index = run_speed(run, shape, fractions, tokens, new_tokens, repeats, kernel, prune_dead, out)
    print_summary(index)
    print(f"report: {index}")
