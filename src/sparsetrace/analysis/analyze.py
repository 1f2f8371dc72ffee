"""``sparsetrace analyze``: hidden-unit use of a model or a checkpoint series, as a run directory.

MODEL is resolved into revisions (one model each, in step order) and one tokenizer:
- a sparsetrace run directory (``config.yaml`` + ``checkpoints/``): its checkpoints, the run's
  tokenizer, tokens = step x the run's tokens per step;
- a directory in the Hugging Face ``from_pretrained`` layout (``config.json``): one revision;
- a directory of such directories: a checkpoint series, ordered by the number that ends each
  name (``step1000``, ``checkpoint-500``); the tokenizer comes from the directory or the first
  revision;
- else a hub id, with ``--revisions`` naming hub revisions (Pythia: ``step1000,step2000``).
The same ``tokens`` tokens of ``data``, packed into full batches of batch_size x seq_len, pass
through every revision; the output has the files of a training run (docs/analysis.md).
"""

from __future__ import annotations

import gc
import json
import math
import platform
import re
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import numpy as np
import torch
import yaml
from torch import Tensor, nn
from tqdm import tqdm

import sparsetrace
from sparsetrace.analysis.locate import LayerSelection, check_gated, locate, select
from sparsetrace.analysis.tracer import Trace, trace
from sparsetrace.data.config import DataConfig, cache_root
from sparsetrace.data.sources import Corpus, load_corpus
from sparsetrace.device import resolve_device
from sparsetrace.errors import UserError
from sparsetrace.metrics import DEFAULT_PERCENTILES
from sparsetrace.model.transformer import Transformer
from sparsetrace.rundir import RunWriter, atomic_write_text
from sparsetrace.tracking import LifecycleTracker

TRAILING_NUMBER = re.compile(r"(\d+)$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
DOCS_PER_ENCODE = 16  # documents per tokenizer call: whole plays are tens of thousands of tokens
HUB_PROBE_S = 3.0
LIFECYCLE_BATCH = "first batch of each revision (the same tokens for every revision)"


class Encoder(Protocol):
    """What packing needs of a tokenizer (sparsetrace's own tokenizers have this shape)."""

    eot_id: int | None

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]: ...


class ModelTokenizer:
    """A transformers tokenizer as an :class:`Encoder`; documents are separated by its EOS."""

    def __init__(self, tok: Any) -> None:
        self.tok, self.eot_id = tok, tok.eos_token_id

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        # verbose=False: long documents are cut into windows here, not fed to the model whole
        ids = self.tok(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return [np.asarray(i, dtype=np.int64) for i in ids]


@dataclass
class Revision:
    label: str
    step: int
    tokens: int  # tokens seen in training: step x tokens per step when known, else the step
    load: Callable[[], nn.Module]


@dataclass
class Subject:
    """A resolved MODEL argument."""

    kind: str
    revisions: list[Revision]
    tokenizer: Encoder
    tokenizer_name: str
    tokens_per_step: int | None
    steps_from: str  # "names" (numbers in the revision names) or "index"


# ------------------------------------------------------------------------------------------------
# Resolving MODEL


def resolve(model: str, revisions: Sequence[str] = (), device_map: str = "") -> Subject:
    """The revisions and tokenizer of a run directory, model directory, series or hub id.
    ``device_map``: Hugging Face models are loaded with it (accelerate places or offloads their
    modules)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():
            if device_map:
                raise UserError("--device-map is for Hugging Face models, not sparsetrace runs")
            return _sparsetrace_run(path, revisions)
        if (path / "config.json").is_file():
            if revisions:
                raise UserError(f"{path} is a single model; --revisions needs a checkpoint series")
            return _model_dir(path, device_map)
        return _series(path, revisions, device_map)
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise UserError(f"{model}: not a model directory, checkpoint series, run or hub id")
    return _hub(model, revisions, device_map)


def _sparsetrace_run(run: Path, wanted: Sequence[str]) -> Subject:
    from sparsetrace.checkpoint import list_checkpoints, load_trained_model
    from sparsetrace.config import load_config
    from sparsetrace.data import prepare_data
    from sparsetrace.sparsing.over_training import checkpoint_step

    ckpts = list_checkpoints(run)
    if not ckpts:
        raise UserError(f"{run}: the run has no checkpoint to analyse")
    cfg = load_config(str(run / "config.yaml"))
    try:
        per_step = int(json.loads((run / "meta.json").read_text())["train"]["tokens_per_step"])
    except (OSError, ValueError, KeyError, TypeError):
        per_step = None

    def loader(ckpt: Path) -> Callable[[], nn.Module]:
        return lambda: load_trained_model(run, ckpt)[0]

    revs = [_revision(c.name, checkpoint_step(c), per_step, loader(c)) for c in ckpts]
    tokenizer = prepare_data(cfg.data).tokenizer  # the run's tokenizer lives in its token cache
    name = f"the run's ({cfg.data.tokenizer})"
    return Subject("sparsetrace run", _pick(revs, wanted, run), tokenizer, name, per_step, "names")


def _model_dir(path: Path, device_map: str) -> Subject:
    rev = Revision(path.name, 0, 0, lambda: _load_model(str(path), device_map=device_map))
    tok_dir = _tokenizer_dir([path], path)
    return Subject("model directory", [rev], _load_tokenizer(tok_dir), tok_dir, None, "index")


def _series(root: Path, wanted: Sequence[str], device_map: str) -> Subject:
    dirs = sorted(d for d in root.iterdir() if (d / "config.json").is_file())
    if not dirs:
        raise UserError(
            f"{root}: neither a model directory (config.json), a checkpoint series "
            "(subdirectories with config.json) nor a sparsetrace run (config.yaml, checkpoints/)"
        )
    labels = [d.name for d in dirs]
    steps, steps_from = _steps(labels)

    def loader(d: Path) -> Callable[[], nn.Module]:
        return lambda: _load_model(str(d), device_map=device_map)

    revs = [_revision(d.name, s, None, loader(d)) for d, s in zip(dirs, steps, strict=True)]
    revs = _pick(sorted(revs, key=lambda r: r.step), wanted, root)
    tok_dir = _tokenizer_dir([root, *dirs], root)
    return Subject("checkpoint series", revs, _load_tokenizer(tok_dir), tok_dir, None, steps_from)


def _hub(model_id: str, wanted: Sequence[str], device_map: str) -> Subject:
    local_only = not _hub_reachable()
    names = list(wanted) or ["main"]
    steps, steps_from = _steps(names)

    def loader(name: str) -> Callable[[], nn.Module]:
        return lambda: _load_model(model_id, name, local_only, device_map)

    revs = [_revision(n, s, None, loader(n)) for n, s in zip(names, steps, strict=True)]
    tokenizer = _load_tokenizer(model_id, names[0], local_only)
    revs.sort(key=lambda r: r.step)
    return Subject("hub", revs, tokenizer, model_id, None, steps_from)


def _tokenizer_dir(candidates: list[Path], where: Path) -> str:
    """The first directory holding tokenizer files (transformers would invent a tokenizer from
    the model's config when there are none)."""
    for d in candidates:
        if any((d / f).is_file() for f in TOKENIZER_FILES):
            return str(d)
    raise UserError(f"{where}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); save one there")


def _revision(
    label: str, step: int, per_step: int | None, load: Callable[[], nn.Module]
) -> Revision:
    return Revision(label, step, step * per_step if per_step else step, load)


def _steps(labels: list[str]) -> tuple[list[int], str]:
    """Step numbers from the names' trailing numbers; the index if some name has none."""
    found = [TRAILING_NUMBER.search(label) for label in labels]
    if all(found):
        steps = [int(m.group(1)) for m in found if m]
        if len(set(steps)) == len(steps):
            return steps, "names"
        raise UserError(f"revisions share step numbers: {', '.join(labels)}")
    return list(range(len(labels))), "index"


def _pick(revs: list[Revision], wanted: Sequence[str], where: Path) -> list[Revision]:
    """The revisions named in ``wanted`` by name or step number (none: all)."""
    if not wanted:
        return revs
    chosen = [r for r in revs if r.label in wanted or str(r.step) in wanted]
    known = {r.label for r in revs} | {str(r.step) for r in revs}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        have = ", ".join(r.label for r in revs)
        raise UserError(f"{where}: no revision {', '.join(unknown)} (have: {have})")
    return chosen


def _hub_reachable() -> bool:
    """False when offline (HF_HUB_OFFLINE) or when the hub's host does not answer quickly:
    transformers would otherwise retry for most of a minute before giving up."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=HUB_PROBE_S).close()
    except OSError:
        return False
    return True


def _from_pretrained(
    what: str, cls: Any, source: str, revision: str | None, local_only: bool, **kwargs: Any
) -> Any:
    try:
        return cls.from_pretrained(source, revision=revision, local_files_only=local_only, **kwargs)
    except Exception as e:  # transformers raises many types (missing files, bad config, network)
        rev = f" (revision {revision})" if revision else ""
        offline = " not in the local cache and the hub is unreachable;" if local_only else ""
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"could not load the {what} of {source}{rev}:{offline} {first}") from None


def _load_model(
    source: str, revision: str | None = None, local_only: bool = False, device_map: str = ""
) -> nn.Module:
    from transformers import AutoModel

    # The base model (no LM head): the MLPs are all that is measured.
    placed = {"device_map": device_map} if device_map else {}
    model = _from_pretrained("model", AutoModel, source, revision, local_only, **placed)
    model.config.use_cache = False
    return model


def _load_tokenizer(
    source: str, revision: str | None = None, local_only: bool = False
) -> ModelTokenizer:
    from transformers import AutoTokenizer

    return ModelTokenizer(
        _from_pretrained("tokenizer", AutoTokenizer, source, revision, local_only)
    )


# ------------------------------------------------------------------------------------------------
# Data


def token_batches(
    data: str, tokenizer: Encoder, n_batches: int, batch_size: int, seq_len: int
) -> tuple[Tensor, Corpus]:
    """(n_batches, batch_size, seq_len) token ids: ``data``'s documents, each followed by the
    tokenizer's end-of-text id, concatenated and cut into windows; and the corpus read."""
    need = n_batches * batch_size * seq_len
    cfg = DataConfig(source=data, max_tokens=need)
    corpus = load_corpus(cfg, cache_root(cfg) / "hf-datasets")
    eot = [] if tokenizer.eot_id is None else [tokenizer.eot_id]
    parts: list[np.ndarray] = []
    have = 0
    for start in range(0, len(corpus.docs), DOCS_PER_ENCODE):
        for ids in tokenizer.encode_batch(corpus.docs[start : start + DOCS_PER_ENCODE]):
            parts += [np.asarray(ids, dtype=np.int64), np.asarray(eot, dtype=np.int64)]
            have += len(ids) + len(eot)
        if have >= need:
            break
    if have < need:
        raise UserError(
            f"data {data!r} gives {have} tokens, {need} needed ({n_batches} batches of "
            f"{batch_size} x {seq_len}); use more text or fewer --tokens"
        )
    stream = torch.from_numpy(np.concatenate(parts)[:need])
    return stream.view(n_batches, batch_size, seq_len), corpus


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
    out = Path(out) if out is not None else Path("runs") / f"analysis-{_slug(model)}"
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
            into = _input_device(net, device)
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
    emb = _embedding(model)
    if int(batches.max()) >= emb.num_embeddings:
        raise UserError(
            f"token id {int(batches.max())} is outside the model's vocabulary of "
            f"{emb.num_embeddings}: the tokenizer does not belong to this model"
        )
    context = _context_length(model)
    if context is not None and batches.shape[-1] > context:
        raise UserError(f"--seq-len {batches.shape[-1]} exceeds the model's context of {context}")
    return model


def _embedding(model: nn.Module) -> nn.Embedding:
    return model.tok_emb if isinstance(model, Transformer) else model.get_input_embeddings()


def _input_device(model: nn.Module, device: torch.device) -> torch.device:
    """Where the token ids go: the embedding's device (a device_map may put it anywhere)."""
    where = _embedding(model).weight.device
    return device if where.type == "meta" else where


def _config_value(model: nn.Module, *keys: str) -> Any:
    """The first of ``keys`` set in a transformers model's config."""
    return next((v for k in keys if (v := getattr(model.config, k, None)) is not None), None)


def _context_length(model: nn.Module) -> int | None:
    if isinstance(model, Transformer):  # only learned positions have a length limit
        return model.cfg.seq_len if model.cfg.pos == "learned" else None
    return _config_value(model, "max_position_embeddings", "n_positions")


def _model_info(model: nn.Module, t: Trace) -> dict[str, Any]:
    if isinstance(model, Transformer):
        activation = model.cfg.activation
    else:
        activation = _config_value(model, "hidden_act", "activation_function")
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
    subject: Subject,
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


def _slug(model: str) -> str:
    name = Path(model).name if Path(model).expanduser().exists() else model
    return re.sub(r"[^\w.-]+", "-", name).strip("-") or "model"
