"""What a Sparsing Law measurement evaluates: a model's revisions, its evaluation windows, where the
results go.

MODEL is anything :func:`sparsetrace.series.resolve` takes:
- a sparsetrace run: its checkpoints, a seeded random sample of its validation split's windows
  (its ``seq_len``), tokens seen = step x the run's tokens per step; results go into the run;
- a Hugging Face model directory, a directory of them (a checkpoint series) or a hub id with
  revisions: loaded as causal language models, one revision at a time, every revision's config
  checked first (one architecture, one vocabulary); the windows of token set k are a seeded random
  sample of the k-th pool of ``SAMPLE_FROM`` times the windows needed, cut from ``data`` (any
  source ``analyze`` takes) with the model's tokenizer; tokens seen are known only when
  ``tokens_per_step`` is given (Pythia: 2,097,152); results go into ``out``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

import sparsetrace
from sparsetrace.data import get_batch
from sparsetrace.device import evaluation_device, resolve_device, use_arithmetic
from sparsetrace.errors import UserError
from sparsetrace.rundir import atomic_write_text
from sparsetrace.series import ModelSeries, Revision, resolve, slug, token_stream
from sparsetrace.sites import (
    MlpSites,
    activation_of,
    config_context,
    down_weight,
    embedding,
    mlp_sites,
)
from sparsetrace.sparsing.search import TokenBatch

HF_SEQ_LEN = 512  # evaluation window of a Hugging Face model (capped by its context)
# A Hugging Face model's windows are a random sample of a pool of this many times the windows
# needed (as a run's are of its validation split): neighbouring windows share documents, and the
# bootstrap over sequences treats the windows as drawn independently.
SAMPLE_FROM = 4
BATCH_TOKENS = 4096  # tokens per forward pass of the evaluation
# How the evaluation windows are chosen (recorded in sparsing_law.json; files without it used the
# first windows in a row): a seeded random sample of the pool's windows.
WINDOW_SEED = 0
WINDOWS = f"random, seed {WINDOW_SEED}"


def validation_batches(
    val: np.ndarray, seq_len: int, tokens: int, token_set: int = 0
) -> list[TokenBatch]:
    """``n = ceil(tokens / seq_len)`` windows of the token stream ``val`` (all of them if fewer),
    batched: the same fixed token set for every checkpoint and every candidate c. The windows are
    a random sample of the stream's windows (seeded: ``WINDOWS``), not a contiguous run:
    neighbouring windows share documents, and the bootstrap over sequences that gives the
    uncertainty treats them as drawn independently. ``token_set`` k > 0 takes the k-th next n
    windows of the same permutation: a disjoint random sample (for replicates; UserError when the
    stream holds no k-th set)."""
    available = max(0, (len(val) - 1) // seq_len)
    n = min(math.ceil(tokens / seq_len), available)
    if n < 1:
        raise UserError(f"the evaluation tokens hold no window of {seq_len + 1} tokens")
    sets = available // n
    if not 0 <= token_set < sets:
        raise UserError(f"the evaluation tokens hold {sets} disjoint sets of {n} windows of "
                        f"{seq_len} tokens (the evaluation set and at most {sets - 1} "
                        f"replicates); set {token_set} does not fit")  # fmt: skip
    order = np.random.default_rng(WINDOW_SEED).permutation(available)
    windows = np.sort(order[token_set * n : (token_set + 1) * n])
    per_batch = max(1, BATCH_TOKENS // seq_len)
    batches = []
    for start in range(0, n, per_batch):
        window = get_batch(val, windows[start : start + per_batch], seq_len)
        batches.append(TokenBatch(window[:, :-1], window[:, 1:]))
    return batches


@dataclass(frozen=True)
class ModelOptions:
    """How MODEL is read, besides its name (the command line's options of the same names).

    ``revisions``: of a series or hub id (names or step numbers; none: all). For a Hugging Face
    model: ``data`` the evaluation text, ``seq_len`` its window (0: 512 capped by the model's
    context), ``tokens_per_step`` the training tokens per step (0: unknown), ``out`` the
    result directory (None: runs/sparsing-MODEL). ``device`` where to measure ('': a run's
    training device if present, else CUDA when available), ``device_map`` accelerate's
    placement, ``modules`` the down projections named by hand (none: located).
    """

    revisions: tuple[str, ...] = ()
    data: str = "embedded"
    seq_len: int = 0
    tokens_per_step: int = 0
    device: str = ""
    device_map: str = ""
    out: Path | None = None
    modules: tuple[str, ...] = ()


DEFAULT_OPTIONS = ModelOptions()


@dataclass
class LawSource:
    """A resolved MODEL for the Sparsing Law measurements."""

    model: str  # as given
    series: ModelSeries
    val: np.ndarray  # the token stream the evaluation windows are sampled from
    seq_len: int
    out: Path
    device: torch.device
    device_map: str
    tokens_per_step: int | None
    is_run: bool
    data: str  # the run's data source, or the ``data`` the windows were cut from
    modules: tuple[str, ...] = ()  # down projections named by hand (none: located)
    pool: int = 0  # windows per token set's pool (a Hugging Face stream; 0: one pool, a run's)
    facts: dict[str, Any] = field(default_factory=dict)  # the final revision's MLPs, once loaded

    @property
    def revisions(self) -> list[Revision]:
        return self.series.revisions

    @property
    def windows_pool(self) -> int:
        """How many windows the evaluation set's windows were drawn from."""
        return self.pool or (len(self.val) - 1) // self.seq_len

    @cached_property
    def max_id(self) -> int:
        return int(self.val.max())

    def tokens_seen(self, rev: Revision) -> int | None:
        """Training tokens behind a revision; None where the tokens per step are unknown."""
        return rev.step * self.tokens_per_step if self.tokens_per_step else None

    def batches(self, tokens: int, token_set: int = 0) -> list[TokenBatch]:
        """Token set ``token_set`` (0: the evaluation set; k > 0: replicate k, disjoint): for a
        run the k-th sample of its validation split's windows, for a Hugging Face model a sample
        of the k-th pool, so that set 0 does not depend on how many replicates follow it."""
        if tokens < self.seq_len:
            raise UserError(f"--tokens {tokens} is below one window of {self.seq_len} tokens")
        if not self.pool:
            return validation_batches(self.val, self.seq_len, tokens, token_set)
        size = self.pool * self.seq_len
        pools = (len(self.val) - 1) // size
        if not 0 <= token_set < pools:
            raise UserError(f"the text holds {pools} pools of {self.pool} windows (the "
                            f"evaluation set and {pools - 1} replicates); set {token_set} does "
                            "not fit: use more text or fewer --tokens")  # fmt: skip
        pool = self.val[token_set * size : (token_set + 1) * size + 1]
        return validation_batches(pool, self.seq_len, tokens)

    def load(self, rev: Revision) -> nn.Module:
        """The revision in eval mode, where it is measured: on ``device`` (fp32 on a CPU: half
        matmuls are slow or missing there), or where ``device_map`` placed it; its MLP weights
        must be resident (not offloaded) and its vocabulary must hold the token ids."""
        model = rev.load().eval()
        on_cpu = not self.device_map and self.device.type == "cpu"
        if not self.device_map:
            model = model.to(self.device)
        elif all(p.device.type == "cpu" for p in model.parameters()):
            on_cpu = True
        if on_cpu:
            model = model.float()
        sites = self.sites(model)
        weights = [down_weight(m) for m in sites.down.values()]
        weights += [p for s in sites.gates.values() for p in s.module.parameters()]
        if any(w.device.type == "meta" for w in weights):
            raise UserError(f"{rev.label}: --device-map {self.device_map} offloaded MLP weights "
                            "(to CPU memory or disk, loaded only inside accelerate's forward); "
                            "the truncation reads them in its hooks: give the devices room, or "
                            "a map that keeps the MLPs resident")  # fmt: skip
        vocab = embedding(model).num_embeddings
        if self.max_id >= vocab:
            raise UserError(f"token id {self.max_id} is outside the vocabulary of {rev.label} "
                            f"({vocab}): the tokenizer does not belong to this model")  # fmt: skip
        if rev is self.revisions[-1] and not self.is_run:
            self.facts = _facts(model, sites)
        return model

    def sites(self, model: nn.Module) -> MlpSites:
        return mlp_sites(model, list(self.modules) or None)


def open_source(model: str, options: ModelOptions, tokens: int, sets: int = 1) -> LawSource:
    """Resolve ``model`` as ``options`` say, for ``sets`` token sets of ``tokens`` (the evaluation
    set and the replicates); for a Hugging Face model, check every revision's config and read
    the text the windows are sampled from."""
    o = options
    if tokens < 1:
        raise UserError(f"--tokens must be >= 1; got {tokens}")
    if o.seq_len < 0 or o.tokens_per_step < 0:
        raise UserError(f"--seq-len and --tokens-per-step must be >= 0; got {o.seq_len}, "
                        f"{o.tokens_per_step}")  # fmt: skip
    series = resolve(model, o.revisions, o.device_map, lm_head=True)
    if series.kind == "sparsetrace run":
        return _run_source(model, series, o)
    if o.tokens_per_step and series.steps_from == "index":
        raise UserError("--tokens-per-step needs step numbers in the revision names (step1000, "
                        "checkpoint-500); these revisions are numbered by position")  # fmt: skip
    out = _out_dir(model, o.out)
    context = _check_configs(series)
    seq_len = o.seq_len or min(HF_SEQ_LEN, context or HF_SEQ_LEN)
    if context is not None and seq_len > context:
        raise UserError(f"--seq-len {seq_len} exceeds the model's context of {context}")
    if tokens < seq_len:
        raise UserError(f"--tokens {tokens} is below one window of {seq_len} tokens")
    needed = math.ceil(tokens / seq_len)
    ids, _ = token_stream(o.data, series.tokenizer, sets * needed * seq_len + 1,
                          sets * SAMPLE_FROM * needed * seq_len + 1)  # fmt: skip
    pool = min(SAMPLE_FROM * needed, (len(ids) - 1) // seq_len // sets)  # shorter text: smaller
    where = resolve_device(o.device or "auto", "--device")
    return LawSource(model, series, ids.numpy(), seq_len, out, where, o.device_map,
                     o.tokens_per_step or series.tokens_per_step, False, o.data, o.modules,
                     pool)  # fmt: skip


def _run_source(model: str, series: ModelSeries, o: ModelOptions) -> LawSource:
    from sparsetrace.config import load_config
    from sparsetrace.data import prepare_data

    run = Path(model)
    if o.out is not None and Path(o.out).resolve() != run.resolve():
        raise UserError("a run's Sparsing Law results go into the run directory; drop --out")
    if o.seq_len or o.tokens_per_step or o.device_map:
        raise UserError("--seq-len, --tokens-per-step and --device-map are for Hugging Face "
                        "models; a run has its own")  # fmt: skip
    if series.tokens_per_step is None:
        raise UserError(f"{run}: meta.json with train.tokens_per_step is missing")
    cfg = load_config(str(run / "config.yaml"))
    where = (
        resolve_device(o.device, "--device") if o.device else evaluation_device(cfg.train.device)
    )
    if cfg.train.arithmetic == "portable":  # as trained, where the process can still choose
        use_arithmetic("portable", cfg.train.threads, where, strict=False)
    val = prepare_data(cfg.data).val
    return LawSource(model, series, val, cfg.data.seq_len, run, where, "",
                     series.tokens_per_step, True, cfg.data.source, o.modules)  # fmt: skip


def _check_configs(series: ModelSeries) -> int | None:
    """Every revision's config (cheap: no weights) before any is measured, so that a missing
    revision or one of another architecture fails at once, not after the others were measured;
    returns the context length."""
    configs = {rev.label: rev.config() for rev in series.revisions if rev.config is not None}
    if not configs:
        return None
    final = configs[series.revisions[-1].label]
    kind = (getattr(final, "model_type", None), getattr(final, "vocab_size", None))
    for label, config in configs.items():
        other = (getattr(config, "model_type", None), getattr(config, "vocab_size", None))
        if other != kind:
            raise UserError(f"{label} is a {other[0]} with a vocabulary of {other[1]}, "
                            f"{series.revisions[-1].label} a {kind[0]} with {kind[1]}: a series "
                            "is one model's revisions")  # fmt: skip
    return config_context(final)


def _out_dir(model: str, out: Path | None) -> Path:
    """The result directory of a Hugging Face model: ``out``, or runs/sparsing-NAME (NAME: the
    path's last two parts, or the hub id). Refused: a file, a training run, or a directory that
    holds another model's measurement."""
    path = Path(model).expanduser()
    name = slug(f"{path.parent.name}-{path.name}" if path.exists() else model)
    out = Path(out) if out is not None else Path("runs") / f"sparsing-{name}"
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if (out / "checkpoints").is_dir():
        raise UserError(f"--out {out} is a training run; its own results live there")
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return out
    source = (meta.get("model") or {}).get("source") if isinstance(meta, dict) else None
    if source is not None and source != model:
        raise UserError(f"--out {out} holds the measurement of {source}; choose another")
    return out


def _facts(model: nn.Module, sites: MlpSites) -> dict[str, Any]:
    """What the report needs to know of a Hugging Face model: its class and MLPs."""
    return {
        "class": type(model).__name__, "architecture": sites.architecture,
        "activation": activation_of(model), "n_layers": len(sites.down),
        "d_ff": list(sites.widths.values()),
        "gate_tap": bool(sites.gates),  # act(gate) readable: the reference baselines use it
    }  # fmt: skip


def describe(source: LawSource, verb: str, options: dict[str, Any]) -> None:
    """For a Hugging Face model, make ``out`` readable as a run directory (``sparsetrace report
    OUT``): ``config.yaml`` and ``meta.json`` naming the model, its MLPs and the options of
    ``verb``, written with the results (after the measurement, so a failure leaves none) and
    rewritten each time; an ``analyze`` output directory keeps its own."""
    if source.is_run:
        return
    try:
        kind = json.loads((source.out / "meta.json").read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind not in (None, "sparsing-law"):
        return
    facts = source.facts
    config = {"run_name": source.out.name, "kind": "sparsing-law",
              "model": {"source": source.model, "activation": facts.get("activation")},
              verb: options}  # fmt: skip
    where = f"device_map {source.device_map}" if source.device_map else str(source.device)
    meta = {
        "run_name": source.out.name, "kind": "sparsing-law", "status": "finished",
        "step": source.revisions[-1].step, "steps": source.revisions[-1].step,
        "model": {"source": source.model, "kind": source.series.kind, **facts},
        "data": {"source": source.data, "tokenizer": source.series.tokenizer_name},
        "train": {"seq_len": source.seq_len, "tokens_per_step": source.tokens_per_step},
        "device": where,
        "versions": {"sparsetrace": sparsetrace.__version__, "torch": torch.__version__},
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }  # fmt: skip
    source.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(source.out / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    atomic_write_text(source.out / "meta.json", json.dumps(meta, indent=2))
