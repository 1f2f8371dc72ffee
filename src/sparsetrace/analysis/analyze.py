"""``sparsetrace analyze``: hidden-unit use of a model or a checkpoint series, as a run directory.

MODEL is resolved into revisions and one tokenizer by :func:`sparsetrace.series.resolve` (a run,
a Hugging Face model directory, a checkpoint series or a hub id). The same ``tokens`` tokens of
``data``, packed into full batches of batch_size x seq_len, pass
through every revision; the output has the files of a training run (docs/analysis.md).
"""

from __future__ import annotations

import gc
import json
import math
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn
from tqdm import tqdm

import sparsetrace
from sparsetrace.analysis.tracer import Trace, trace
from sparsetrace.data.sources import Corpus
from sparsetrace.device import resolve_device
from sparsetrace.errors import UserError
from sparsetrace.metrics import DEFAULT_PERCENTILES
from sparsetrace.model.transformer import Transformer
from sparsetrace.rundir import RunWriter, atomic_write_text
from sparsetrace.series import ModelSeries, resolve, slug, token_batches
from sparsetrace.sites import (
    LayerSelection,
    activation_of,
    check_gated,
    config_context,
    embedding,
    input_device,
    locate,
    select,
)
from sparsetrace.tracking import LifecycleTracker

LIFECYCLE_BATCH = "first batch of each revision (the same tokens for every revision)"


# ------------------------------------------------------------------------------------------------
# The pipeline


def analyze_model(
    model: str,
    revisions: Sequence[str] = (),
    data: str = "embedded",
    tokens: int = 65536,
    batch_size: int = 16,
    seq_len: int = 512,
    out: Path | None = None,
    gated: str = "product",
    layers: LayerSelection = None,
    device_map: str = "",
) -> Path:
    """Trace every revision of ``model`` on the same tokens; write and return the run directory.

    Revisions are loaded one at a time; each is freed (with its trace) before the next loads,
    so memory holds one model whatever the length of the series."""
    check_gated(gated)
    for name, value in (("tokens", tokens), ("batch_size", batch_size), ("seq_len", seq_len)):
        if value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1; got {value}")
    out = Path(out) if out is not None else Path("runs") / f"analysis-{slug(model)}"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; choose another --out")
    subject = resolve(model, revisions, device_map)
    n_batches = math.ceil(tokens / (batch_size * seq_len))
    batches, corpus = token_batches(data, subject.tokenizer, n_batches, batch_size, seq_len)
    device = resolve_device("auto")
    # The first revision is loaded and checked (vocabulary, context, gated choice) before
    # anything is written.
    net: nn.Module | None = _prepare(subject.revisions[0].load(), device, batches, device_map)
    chosen = [site.name for site in select(locate(net, gated)[1], layers)]
    options = {
        "model": model, "revisions": [r.label for r in subject.revisions], "data": data,
        "tokens": tokens, "batch_size": batch_size, "seq_len": seq_len, "gated": gated,
        "layers": chosen, "device_map": device_map or None,
    }  # fmt: skip
    meta = _initial_meta(out, subject, corpus, options, batches, device)
    out.mkdir(parents=True, exist_ok=True)
    config = {"run_name": out.name, "kind": "analysis", "analysis": options}
    atomic_write_text(out / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    writer = RunWriter(out, DEFAULT_PERCENTILES, tensorboard=False)
    tracker = LifecycleTracker()
    started = time.monotonic()
    progress = tqdm(total=len(subject.revisions) * n_batches, desc="analyze", disable=None)
    try:
        for rev in subject.revisions:
            if net is None:
                net = _prepare(rev.load(), device, batches, device_map)
            into = input_device(net, device)
            with torch.no_grad(), trace(net, layers=chosen, gated=gated) as t:
                for batch in batches:
                    net(batch.to(into))
                    progress.update()
            writer.log_sparsity(rev.step, rev.tokens, t.layer_stats())
            tracker.update(rev.step, t.first_batch_used)
            writer.write_lifecycle(tracker)
            info = _model_info(net, t)
            meta["model"].update(info)
            meta["analysis"]["revisions"].append(
                {"label": rev.label, "step": rev.step, "tokens": rev.tokens}
            )
            meta.update(step=rev.step, precision=info["dtype"])
            _write_meta(out, meta, started)
            # Free the revision (the trace holds it too) before the next one is loaded.
            net = t = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    except BaseException as err:
        meta["status"] = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        _write_meta(out, meta, started)
        raise
    finally:
        progress.close()
        writer.close()
    meta["status"] = "finished"
    _write_meta(out, meta, started)
    return out


def _prepare(
    model: nn.Module, device: torch.device, batches: Tensor, device_map: str = ""
) -> nn.Module:
    """``model`` in eval mode on ``device`` (fp32 on CPU), checked against the token batches.
    A model placed by ``device_map`` stays where accelerate put it."""
    model = model.eval()
    if not device_map:
        model = model.to(device)
        half = (torch.float16, torch.bfloat16)
        if device.type == "cpu" and next(model.parameters()).dtype in half:
            model = model.float()  # half-precision matmuls are slow or missing on CPUs
    emb = embedding(model)
    if int(batches.max()) >= emb.num_embeddings:
        raise UserError(
            f"token id {int(batches.max())} is outside the model's vocabulary of "
            f"{emb.num_embeddings}: the tokenizer does not belong to this model"
        )
    context = _context_length(model)
    if context is not None and batches.shape[-1] > context:
        raise UserError(f"--seq-len {batches.shape[-1]} exceeds the model's context of {context}")
    return model


def _context_length(model: nn.Module) -> int | None:
    if isinstance(model, Transformer):  # only learned positions have a length limit
        return model.cfg.seq_len if model.cfg.pos == "learned" else None
    return config_context(getattr(model, "config", None))


def _model_info(model: nn.Module, t: Trace) -> dict[str, Any]:
    activation = activation_of(model)
    summary = t.summary(aggregate=True)
    return {
        "architecture": t.architecture,
        "class": type(model).__name__,
        "measured": sorted(set(summary["measured"])),
        "n_layers": len(summary),
        "d_ff": [int(h) for h in summary["hidden"]],
        "activation": activation,
        "n_params": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "modules": dict(zip(summary["name"], summary["module"], strict=True)),
    }


def _initial_meta(
    out: Path,
    subject: ModelSeries,
    corpus: Corpus,
    options: dict[str, Any],
    batches: Tensor,
    device: torch.device,
) -> dict[str, Any]:
    import transformers

    last = subject.revisions[-1]
    return {
        "run_name": out.name,
        "kind": "analysis",
        "status": "running",
        "step": None,
        "steps": last.step,
        "model": {"source": options["model"], "kind": subject.kind, "gated": options["gated"]},
        "data": {
            "source": corpus.source, "name": corpus.name, "licence": corpus.licence,
            "tokenizer": subject.tokenizer_name, "n_tokens": batches.numel(),
        },
        # The batch the metrics were measured on (what the report's "batch" row shows); the
        # tokens per training step only when the run says so.
        "train": {
            "batch_size": options["batch_size"], "seq_len": options["seq_len"],
            "tokens_per_step": subject.tokens_per_step,
        },
        "analysis": {
            **options, "tokens_analysed": batches.numel(), "batches": batches.shape[0],
            "steps_from": subject.steps_from, "lifecycle": LIFECYCLE_BATCH,
            "revisions": [],  # label, step and tokens of each revision once analysed
        },
        "device": str(device),
        "versions": {
            "sparsetrace": sparsetrace.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
        },
        "command": " ".join(sys.argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }  # fmt: skip


def _write_meta(out: Path, meta: dict[str, Any], started: float) -> None:
    meta.update(
        elapsed_s=round(time.monotonic() - started, 3),
        updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2))
