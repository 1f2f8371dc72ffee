"""A MODEL argument resolved into revisions (one model each, in step order) and one tokenizer.

What ``analyze``, ``sparsing-law`` and ``sparsing-baselines`` take as MODEL:
- a sparsetrace run directory (``config.yaml`` + ``checkpoints/``): its checkpoints, the run's
  tokenizer, tokens = step x the run's tokens per step;
- a directory in the Hugging Face ``from_pretrained`` layout (``config.json``): one revision;
- a directory of such directories: a checkpoint series, ordered by the number that ends each
  name (``step1000``, ``checkpoint-500``); the tokenizer comes from the directory or the first
  revision;
- else a hub id, with ``revisions`` naming hub revisions (Pythia: ``step1000,step2000``).
Each revision loads on demand (``Revision.load``), so a caller can hold one at a time; a Hugging
Face revision's config loads alone (``Revision.config``), to check every revision before any is
measured.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import numpy as np
import torch
from torch import Tensor, nn

from sparsetrace.checkpoint import checkpoint_step, list_checkpoints, load_trained_model
from sparsetrace.data.config import DataConfig, cache_root
from sparsetrace.data.sources import Corpus, load_corpus
from sparsetrace.errors import UserError

TRAILING_NUMBER = re.compile(r"(\d+)$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
DOCS_PER_ENCODE = 16  # documents per tokenizer call: whole plays are tens of thousands of tokens
HUB_PROBE_S = 3.0


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
    config: Callable[[], Any] | None = None  # a transformers revision's config (None: ours)


@dataclass
class ModelSeries:
    """A resolved MODEL argument: its revisions in step order and its tokenizer."""

    kind: str
    revisions: list[Revision]
    tokenizer: Encoder
    tokenizer_name: str
    tokens_per_step: int | None
    steps_from: str  # "names" (numbers in the revision names) or "index"


def resolve(
    model: str, revisions: Sequence[str] = (), device_map: str = "", lm_head: bool = False
) -> ModelSeries:
    """The revisions and tokenizer of a run directory, model directory, series or hub id.
    ``device_map``: Hugging Face models are loaded with it (accelerate places or offloads their
    modules); ``lm_head``: as causal language models (``AutoModelForCausalLM``: logits, for a
    loss), else as base models (the MLPs are all that tracing reads)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():
            if device_map:
                raise UserError("--device-map is for Hugging Face models, not sparsetrace runs")
            return _sparsetrace_run(path, revisions)
        if (path / "config.json").is_file():
            if revisions:
                raise UserError(f"{path} is a single model; --revisions needs a checkpoint series")
            return _model_dir(path, device_map, lm_head)
        return _series(path, revisions, device_map, lm_head)
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise UserError(f"{model}: not a model directory, checkpoint series, run or hub id")
    return _hub(model, revisions, device_map, lm_head)


def _sparsetrace_run(run: Path, wanted: Sequence[str]) -> ModelSeries:
    from sparsetrace.config import load_config
    from sparsetrace.data import prepare_data

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
    revs = _pick(revs, wanted, run)
    return ModelSeries("sparsetrace run", revs, tokenizer, name, per_step, "names")


def _model_dir(path: Path, device_map: str, lm_head: bool) -> ModelSeries:
    rev = Revision(path.name, 0, 0, lambda: load_model(str(path), None, False, device_map, lm_head),
                   lambda: load_config(str(path)))  # fmt: skip
    tok_dir = _tokenizer_dir([path], path)
    return ModelSeries("model directory", [rev], load_tokenizer(tok_dir), tok_dir, None, "index")


def _series(root: Path, wanted: Sequence[str], device_map: str, lm_head: bool) -> ModelSeries:
    dirs = sorted(d for d in root.iterdir() if (d / "config.json").is_file())
    if not dirs:
        raise UserError(
            f"{root}: neither a model directory (config.json), a checkpoint series "
            "(subdirectories with config.json) nor a sparsetrace run (config.yaml, checkpoints/)"
        )
    labels = [d.name for d in dirs]
    steps, steps_from = _steps(labels)

    def loader(d: Path) -> Callable[[], nn.Module]:
        return lambda: load_model(str(d), None, False, device_map, lm_head)

    revs = [_revision(d.name, s, None, loader(d), lambda d=d: load_config(str(d)))
            for d, s in zip(dirs, steps, strict=True)]  # fmt: skip
    revs = _pick(sorted(revs, key=lambda r: r.step), wanted, root)
    tok_dir = _tokenizer_dir([root, *dirs], root)
    tokenizer = load_tokenizer(tok_dir)
    return ModelSeries("checkpoint series", revs, tokenizer, tok_dir, None, steps_from)


def _hub(model_id: str, wanted: Sequence[str], device_map: str, lm_head: bool) -> ModelSeries:
    local_only = not _hub_reachable()
    names = list(wanted) or ["main"]
    if len(set(names)) != len(names):
        raise UserError(f"--revisions names a revision twice: {', '.join(names)}")
    steps, steps_from = _steps(names)

    def loader(name: str) -> Callable[[], nn.Module]:
        return lambda: load_model(model_id, name, local_only, device_map, lm_head)

    revs = [_revision(n, s, None, loader(n), lambda n=n: load_config(model_id, n, local_only))
            for n, s in zip(names, steps, strict=True)]  # fmt: skip
    tokenizer = load_tokenizer(model_id, names[0], local_only)
    revs.sort(key=lambda r: r.step)
    return ModelSeries("hub", revs, tokenizer, model_id, None, steps_from)


def _tokenizer_dir(candidates: list[Path], where: Path) -> str:
    """The first directory holding tokenizer files (transformers would invent a tokenizer from
    the model's config when there are none)."""
    for d in candidates:
        if any((d / f).is_file() for f in TOKENIZER_FILES):
            return str(d)
    raise UserError(f"{where}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); save one there")


def _revision(
    label: str, step: int, per_step: int | None, load: Callable[[], nn.Module],
    config: Callable[[], Any] | None = None,
) -> Revision:  # fmt: skip
    return Revision(label, step, step * per_step if per_step else step, load, config)


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
    if len(set(wanted)) != len(wanted):
        raise UserError(f"--revisions names a revision twice: {', '.join(wanted)}")
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


def from_pretrained(
    what: str, cls: Any, source: str, revision: str | None, local_only: bool, **kwargs: Any
) -> Any:
    try:
        return cls.from_pretrained(source, revision=revision, local_files_only=local_only, **kwargs)
    except Exception as e:  # transformers raises many types (missing files, bad config, network)
        rev = f" (revision {revision})" if revision else ""
        offline = " not in the local cache and the hub is unreachable;" if local_only else ""
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"could not load the {what} of {source}{rev}:{offline} {first}") from None


def load_model(
    source: str,
    revision: str | None = None,
    local_only: bool = False,
    device_map: str = "",
    lm_head: bool = False,
) -> nn.Module:
    """A transformers model: the base model, or with ``lm_head`` the causal language model."""
    from transformers import AutoModel, AutoModelForCausalLM

    kind = AutoModelForCausalLM if lm_head else AutoModel
    placed = {"device_map": device_map} if device_map else {}
    model = from_pretrained("model", kind, source, revision, local_only, **placed)
    model.config.use_cache = False
    return model


def load_config(source: str, revision: str | None = None, local_only: bool = False) -> Any:
    """A transformers model's config alone (no weights)."""
    from transformers import AutoConfig

    return from_pretrained("config", AutoConfig, source, revision, local_only)


def load_tokenizer(
    source: str, revision: str | None = None, local_only: bool = False
) -> ModelTokenizer:
    from transformers import AutoTokenizer

    return ModelTokenizer(from_pretrained("tokenizer", AutoTokenizer, source, revision, local_only))


def token_batches(
    data: str, tokenizer: Encoder, n_batches: int, batch_size: int, seq_len: int
) -> tuple[Tensor, Corpus]:
    """(n_batches, batch_size, seq_len) token ids: ``data``'s documents, each followed by the
    tokenizer's end-of-text id, concatenated and cut into windows; and the corpus read."""
    stream, corpus = token_stream(data, tokenizer, n_batches * batch_size * seq_len)
    return stream.view(n_batches, batch_size, seq_len), corpus


def token_stream(
    data: str, tokenizer: Encoder, need: int, at_most: int = 0
) -> tuple[Tensor, Corpus]:
    """``data``'s documents as one stream of token ids, each document followed by the
    tokenizer's end-of-text id: ``need`` tokens at least (else UserError), up to ``at_most`` when
    the text has them (0: exactly ``need``); and the corpus read."""
    at_most = max(at_most, need)
    cfg = DataConfig(source=data, max_tokens=at_most)
    corpus = load_corpus(cfg, cache_root(cfg) / "hf-datasets")
    eot = [] if tokenizer.eot_id is None else [tokenizer.eot_id]
    parts: list[np.ndarray] = []
    have = 0
    for start in range(0, len(corpus.docs), DOCS_PER_ENCODE):
        for ids in tokenizer.encode_batch(corpus.docs[start : start + DOCS_PER_ENCODE]):
            parts += [np.asarray(ids, dtype=np.int64), np.asarray(eot, dtype=np.int64)]
            have += len(ids) + len(eot)
        if have >= at_most:
            break
    if have < need:
        raise UserError(f"data {data!r} gives {have} tokens, {need} needed; use more text or "
                        "fewer --tokens")  # fmt: skip
    return torch.from_numpy(np.concatenate(parts)[:at_most]), corpus


def slug(model: str) -> str:
    """A MODEL argument as a directory name: a path's last part, or the hub id made safe."""
    name = Path(model).name if Path(model).expanduser().exists() else model
    return re.sub(r"[^\w.-]+", "-", name).strip("-") or "model"
