"""One run configuration: shipped YAML presets plus ``--section.key value`` overrides, validated.

An unknown key or a bad value is a :class:`UserError` naming the valid keys or choices.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from sparsetrace.budgets import SPARSING_TOKENS
from sparsetrace.data import DataConfig
from sparsetrace.errors import UserError
from sparsetrace.model.transformer import ModelConfig


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 16  # device batch: the sparsity metrics are computed on it (paper: 16)
    grad_accum: int = 1
    lr: float = 3e-3
    # The MLP matrices' LR relative to lr (muP-style per-layer LR; 1: one LR for all).
    mlp_lr_mult: float = 1.0
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 200
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    # auto: bf16 autocast on a CUDA GPU that supports it, fp32 on the CPU (whatever the CPU's bf16
    # units: a run must not compute differently from one host to the next).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # CUDA only: TF32 tensor cores for fp32 matmuls and convolutions (10-bit mantissa inputs,
    # fp32 accumulation). Recorded in meta.json; the CPU ignores it.
    tf32: bool = True
    compile: bool = False
    # Read the loss and gradient norm on the host every N steps (train.csv still gets one row per
    # step). 1 checks every step at once; on a GPU a larger N lets the host run ahead of the
    # device instead of waiting for it twice a step. A NaN loss is found at the next read.
    log_every: int = 1
    # Multi-process (torchrun): ddp replicates the model; fsdp shards it (FSDP2 fully_shard).
    parallel: Literal["ddp", "fsdp"] = "ddp"
    device: str = "auto"  # auto: cuda if available, else cpu
    threads: int = 0  # CPU threads for torch; 0 leaves torch's default (portable: 2)
    # CPU rounding. native: the host's fastest kernels, whose rounding differs between kinds of
    # CPU; portable: by construction the same bits on every x86-64 CPU with AVX2 (AVX2 kernels,
    # MKL's COMPATIBLE branch, fixed threads; ~2x slower to train). A GPU run ignores it.
    arithmetic: Literal["native", "portable"] = "native"


@dataclass
class TraceConfig:
    every: int = 25  # measure every N steps (and at the first and last step); 0: never
    percentiles: list[float] = field(default_factory=lambda: [50.0, 65.0, 75.0, 90.0])
    # Sparsing Law PPL-p% activation ratio every N steps (0: off; each costs a few passes over
    # `sparsing_tokens` validation tokens plus the CETT curves). `sparsing_cett` > 0 fixes the
    # CETT c (comparable over training, as the paper does post hoc); 0 searches c for PPL +p%.
    sparsing_every: int = 0
    sparsing_cett: float = 0.0
    sparsing_p: float = 1.0
    sparsing_tokens: int = SPARSING_TOKENS.training


@dataclass
class EvalConfig:
    every: int = 250
    batches: int = 8


@dataclass
class CheckpointConfig:
    every: int = 500  # and at the last step; 0: no checkpoints at all (benchmarks)
    keep: int = 0  # keep the newest N checkpoints; 0 keeps all (a checkpoint series)
    # On a GPU: copy the state to the CPU, then write the files in a background thread while
    # training goes on (one write at a time). On the CPU the copy would cost as much as the
    # write, so checkpoints are written in the step.
    background: bool = True


@dataclass
class MaskConfig:
    """The masking experiment (paper 4.1.1): at step ``at_step`` fix a 0/1 hidden-unit mask."""

    at_step: int = 0  # 0: never
    # dead: mask the units unused in that step's batch; random: the same per-layer fraction,
    # chosen at random.
    kind: Literal["dead", "random"] = "dead"
    seed: int = 0  # for the random mask


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    trace: TraceConfig = field(default_factory=TraceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    out_dir: str = "runs"
    run_name: str = ""  # empty: the preset's name


def preset_names() -> list[str]:
    return sorted(
        p.name.removesuffix(".yaml")
        for p in resources.files("sparsetrace.presets").iterdir()
        if p.name.endswith(".yaml")
    )


def load_config(preset: str = "cpu", overrides: list[str] | None = None) -> RunConfig:
    """A preset name or a YAML path, then ``--a.b value`` overrides, validated into a RunConfig."""
    raw = _read_preset(preset)
    for key, value in _parse_overrides(overrides or []):
        _set_dotted(raw, key, value)
    cfg = from_dict(RunConfig, raw, "")
    if not cfg.run_name:
        cfg.run_name = Path(preset).stem
    _check(cfg)
    return cfg


def _read_preset(preset: str) -> dict[str, Any]:
    path = Path(preset)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise UserError(f"config file {path} does not exist")
        text = path.read_text()
    elif preset in preset_names():
        text = resources.files("sparsetrace.presets").joinpath(f"{preset}.yaml").read_text()
    else:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(preset_names())}")
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{preset}: {_yaml_problem(err)}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{preset}: a config must be a mapping of sections")
    return raw


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line: where the YAML parser stopped and why (its own message spans several lines
    with an excerpt of the file)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"invalid YAML at {where}{problem}"


def _parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) < 3:
            raise UserError(f"unexpected argument {arg!r}; overrides look like --train.lr 1e-3")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        elif i + 1 < len(args):
            i += 1
            value = args[i]
        else:
            raise UserError(f"override {arg} has no value")
        pairs.append((key, value))
        i += 1
    return pairs


def _set_dotted(raw: dict[str, Any], key: str, value: str) -> None:
    *sections, leaf = key.split(".")
    node = raw
    for s in sections:
        node = node.setdefault(s, {})
        if not isinstance(node, dict):
            raise UserError(f"--{key}: {s} is not a section")
    node[leaf] = yaml.safe_load(value) if value != "" else ""


def from_dict(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys and converting/validating values."""
    if not isinstance(raw, dict):
        raise UserError(f"{where or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise UserError(
            f"unknown config key {prefix}{unknown[0]}; valid keys"
            f"{' of ' + where if where else ''}: {', '.join(fields)}"
        )
    kwargs = {
        name: _convert(hints[name], value, f"{where}.{name}" if where else name)
        for name, value in raw.items()
    }
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise UserError(f"{where or 'config'}: {err}") from None


def _convert(typ: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if dataclasses.is_dataclass(typ):
        return from_dict(typ, value or {}, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where)
    if origin is Literal:
        if value not in args:
            raise UserError(f"{where}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{where}: expected a list like [1, 2], got {value!r}")
        return [_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if typ is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        return value
    if typ in (int, float):
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = (
                    float(value) if typ is float or not value.lstrip("-").isdigit() else int(value)
                )
            except ValueError:
                raise UserError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UserError(f"{where}: expected a number, got {value!r}")
        if typ is int and float(value) != int(value):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        return typ(value)
    if typ is str:
        return str(value)
    return value


def _check(cfg: RunConfig) -> None:
    """Value ranges the types cannot express."""
    cfg.data.validate()
    positive = {
        "train.steps": cfg.train.steps, "train.batch_size": cfg.train.batch_size,
        "train.grad_accum": cfg.train.grad_accum,
        "eval.every": cfg.eval.every, "eval.batches": cfg.eval.batches,
        "model.n_layers": cfg.model.n_layers,
        "train.log_every": cfg.train.log_every,
        "model.d_model": cfg.model.d_model, "data.seq_len": cfg.data.seq_len,
    }  # fmt: skip
    for key, value in positive.items():
        if value <= 0:
            raise UserError(f"{key} must be positive, got {value}")
    if not 0 <= cfg.mask.at_step < cfg.train.steps:
        raise UserError(f"mask.at_step must be in [0, train.steps), got {cfg.mask.at_step}")
    if cfg.trace.sparsing_every < 0 or not 0 <= cfg.trace.sparsing_cett <= 1:
        raise UserError("trace.sparsing_every must be >= 0 and trace.sparsing_cett in [0, 1]")
    if cfg.checkpoint.every < 0:
        raise UserError(f"checkpoint.every must be >= 0 (0: none), got {cfg.checkpoint.every}")
    if cfg.trace.every < 0:
        raise UserError(f"trace.every must be >= 0 (0: no tracing), got {cfg.trace.every}")
    if cfg.train.lr <= 0 or cfg.train.mlp_lr_mult <= 0:
        raise UserError(
            f"train.lr and train.mlp_lr_mult must be positive, got {cfg.train.lr}, "
            f"{cfg.train.mlp_lr_mult}"
        )
    if any(w <= 0 for w in cfg.model.widths):
        raise UserError(f"model.d_ff must be positive, got {cfg.model.widths}")
    if any(not 0 <= p <= 100 for p in cfg.trace.percentiles):
        raise UserError(f"trace.percentiles must lie in [0, 100], got {cfg.trace.percentiles}")


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain dict of the resolved config (for config.yaml); derived fields left out."""
    out = dataclasses.asdict(cfg)
    out["model"].pop("widths", None)
    return out
