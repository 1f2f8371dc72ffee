"""What a Sparsing Law measurement evaluates: a model's revisions, its evaluation tokens, where the
results go.

MODEL is anything :func:`sparsetrace.series.resolve` takes:
- a sparsetrace run: its checkpoints, a seeded random sample of its validation split's windows
  (its ``seq_len``), tokens seen = step x the run's tokens per step; results go into the run;
- a Hugging Face model directory, a directory of them (a checkpoint series) or a hub id with
  revisions: loaded as causal language models, one revision at a time; the evaluation windows are
  a seeded random sample of the windows of up to ``SAMPLE_FROM`` times the tokens needed of
  ``data`` (any source ``analyze`` takes), read with the model's tokenizer; tokens seen are
  known only when ``tokens_per_step`` is given (Pythia: 2,097,152); results go into ``out``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

import sparsetrace
from sparsetrace.device import evaluation_device, resolve_device
from sparsetrace.errors import UserError
from sparsetrace.rundir import atomic_write_text
from sparsetrace.series import ModelSeries, Revision, resolve, slug, token_stream
from sparsetrace.sites import MlpSites, activation_name, embedding, mlp_sites

HF_SEQ_LEN = 512  # evaluation window of a Hugging Face model (capped by its context)
# A Hugging Face model's windows are a random sample of up to this many times the tokens needed
# (as a run's are of its validation split): neighbouring windows share documents, and the
# bootstrap over sequences treats the windows as drawn independently.
SAMPLE_FROM = 4


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

    def stream_tokens(self, tokens: int, sets: int = 1) -> int:
        """Tokens of ``data`` a Hugging Face model's evaluation needs: ``sets`` disjoint sets of
        ``tokens`` in whole windows, plus the last window's target."""
        window = self.seq_len or HF_SEQ_LEN
        return sets * math.ceil(tokens / window) * window + 1


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
    # a revision loaded while resolving (to read its context), handed to its first load()
    preloaded: dict[str, nn.Module] = field(default_factory=dict, repr=False)

    @property
    def revisions(self) -> list[Revision]:
        return self.series.revisions

    def tokens_seen(self, rev: Revision) -> int | None:
        """Training tokens behind a revision; None where the tokens per step are unknown."""
        return rev.step * self.tokens_per_step if self.tokens_per_step else None

    def load(self, rev: Revision) -> nn.Module:
        """The revision in eval mode, where it is measured: on ``device`` (fp32 on a CPU: half
        matmuls are slow or missing there), or where ``device_map`` placed it."""
        model = (self.preloaded.pop(rev.label, None) or rev.load()).eval()
        if not self.device_map:
            model = model.to(self.device)
            if self.device.type == "cpu":
                model = model.float()
        vocab = embedding(model).num_embeddings
        if int(self.val.max()) >= vocab:
            raise UserError(f"token id {int(self.val.max())} is outside the vocabulary of "
                            f"{rev.label} ({vocab}): the tokenizer does not belong to this "
                            "model")  # fmt: skip
        return model

    def sites(self, model: nn.Module) -> MlpSites:
        return mlp_sites(model, list(self.modules) or None)


def open_source(model: str, options: ModelOptions, stream_tokens: int = 0) -> LawSource:
    """Resolve ``model`` as ``options`` say; for a Hugging Face model, cut ``stream_tokens``
    tokens of ``options.data`` (the evaluation windows are sampled from them)."""
    o = options
    series = resolve(model, o.revisions, o.device_map, lm_head=True)
    if series.kind == "sparsetrace run":
        return _run_source(model, series, o)
    seq_len, tokens_per_step = o.seq_len, o.tokens_per_step
    if seq_len < 0 or tokens_per_step < 0:
        raise UserError(f"--seq-len and --tokens-per-step must be >= 0; got {seq_len}, "
                        f"{tokens_per_step}")  # fmt: skip
    where = resolve_device(o.device or "auto")
    final = series.revisions[-1]
    preloaded = {final.label: final.load()}
    context = _context(preloaded[final.label])
    seq_len = seq_len or min(HF_SEQ_LEN, context or HF_SEQ_LEN)
    if context is not None and seq_len > context:
        raise UserError(f"--seq-len {seq_len} exceeds the model's context of {context}")
    need = max(stream_tokens, seq_len + 1)
    ids, _ = token_stream(o.data, series.tokenizer, need, SAMPLE_FROM * need)
    out = Path(o.out) if o.out is not None else Path("runs") / f"sparsing-{slug(model)}"
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    return LawSource(model, series, ids.numpy(), seq_len, out, where, o.device_map,
                     tokens_per_step or series.tokens_per_step, False, o.data, o.modules,
                     preloaded)  # fmt: skip


def _run_source(model: str, series: ModelSeries, o: ModelOptions) -> LawSource:
    from sparsetrace.config import load_config
    from sparsetrace.data import prepare_data

    run = Path(model)
    if o.out is not None and Path(o.out).resolve() != run.resolve():
        raise UserError("a run's Sparsing Law results go into the run directory; drop --out")
    if o.seq_len or o.tokens_per_step:
        raise UserError("--seq-len and --tokens-per-step are a run's own (config.yaml, "
                        "meta.json); they are for Hugging Face models")  # fmt: skip
    if series.tokens_per_step is None:
        raise UserError(f"{run}: meta.json with train.tokens_per_step is missing")
    cfg = load_config(str(run / "config.yaml"))
    where = resolve_device(o.device) if o.device else evaluation_device(cfg.train.device)
    val = prepare_data(cfg.data).val
    return LawSource(model, series, val, cfg.data.seq_len, run, where, "",
                     series.tokens_per_step, True, cfg.data.source, o.modules)  # fmt: skip


def _context(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return next((v for k in ("max_position_embeddings", "n_positions")
                 if isinstance(v := getattr(config, k, None), int)), None)  # fmt: skip


def describe(source: LawSource, model: nn.Module, options: dict[str, Any]) -> None:
    """For a Hugging Face model, make ``out`` readable as a run directory (``sparsetrace report
    OUT``): ``config.yaml`` and ``meta.json`` naming the model, its MLPs and the options —
    written only where absent, so that an ``analyze`` output directory keeps its own."""
    if source.is_run:
        return
    sites = source.sites(model)
    activation = activation_name(model)
    source.out.mkdir(parents=True, exist_ok=True)
    config = {"run_name": source.out.name, "kind": "sparsing-law",
              "model": {"source": source.model, "activation": activation},
              "sparsing_law": options}  # fmt: skip
    meta = {
        "run_name": source.out.name, "kind": "sparsing-law", "status": "finished",
        "step": source.revisions[-1].step, "steps": source.revisions[-1].step,
        "model": {
            "source": source.model, "kind": source.series.kind, "class": type(model).__name__,
            "architecture": sites.architecture, "activation": activation,
            "n_layers": len(sites.down), "d_ff": list(sites.widths.values()),
            "gated": bool(sites.gates),
        },
        "data": {"source": source.data, "tokenizer": source.series.tokenizer_name},
        "train": {"seq_len": source.seq_len, "tokens_per_step": source.tokens_per_step},
        "device": str(source.device),
        "versions": {"sparsetrace": sparsetrace.__version__, "torch": torch.__version__},
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }  # fmt: skip
    for name, content in (("config.yaml", yaml.safe_dump(config, sort_keys=False)),
                          ("meta.json", json.dumps(meta, indent=2))):  # fmt: skip
        if not (source.out / name).exists():
            atomic_write_text(source.out / name, content)
