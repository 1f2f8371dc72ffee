"""Tokenize a corpus once into memory-mapped train/val token streams, cached by content."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparsetrace.data.batching import n_windows
from sparsetrace.data.config import DataConfig, cache_root
from sparsetrace.data.sources import (
    HUB_PREFIX,
    PROSE,
    Corpus,
    effective_max_docs,
    load_corpus,
    prose_manifest,
)
from sparsetrace.data.tokenizer import (
    Tokenizer,
    build_tokenizer,
    load_cached_tokenizer,
    tokenizer_identity,
)
from sparsetrace.errors import UserError

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the entry layout or tokenization rules change
DOC_SPLIT_MIN_DOCS = 20  # fewer documents than this: split the token stream instead
_ENCODE_CHUNK = 1024  # documents per encode_batch call: bounds the Python-int lists alive at once


@dataclass
class PreparedData:
    """Packed train/val token streams and what produced them."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    eot_id: int
    tokenizer: Tokenizer
    info: dict
    seq_len: int

    def n_sequences(self, split: str) -> int:
        """Packed sequences of seq_len+1 tokens in `split` ("train" or "val")."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        tokens = self.train if split == "train" else self.val
        return n_windows(len(tokens), self.seq_len)


def _hash_json(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()


def _cache_key(corpus_id: dict, tokenizer_id: dict, cfg: DataConfig) -> str:
    return _hash_json(
        {
            "format": CACHE_FORMAT,
            "corpus": corpus_id,
            "tokenizer": tokenizer_id,
            "val_fraction": cfg.val_fraction,
            "max_docs": effective_max_docs(cfg),
            "max_tokens": cfg.max_tokens,
        }
    )[:16]


def _dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size < 65536 else np.uint32)


def _tokenize(corpus: Corpus, tok: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """All documents, each followed by EOT, as one uint32 stream; and each document's start."""
    parts = []
    for i in range(0, len(corpus.docs), _ENCODE_CHUNK):
        parts.extend(tok.encode_batch(corpus.docs[i : i + _ENCODE_CHUNK]))
    lengths = np.array([len(p) + 1 for p in parts], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    tokens = np.full(int(lengths.sum()), tok.eot_id, dtype=np.uint32)
    for part, start in zip(parts, starts, strict=True):
        tokens[start : start + len(part)] = part
    return tokens, starts


def _split(tokens: np.ndarray, starts: np.ndarray, val_fraction: float) -> tuple[int, dict]:
    """Where val begins: the tail documents if there are enough, else the tail tokens."""
    n_docs = len(starts)
    if n_docs >= DOC_SPLIT_MIN_DOCS:
        n_val_docs = max(1, round(val_fraction * n_docs))
        split_at = int(starts[n_docs - n_val_docs])
        return split_at, {
            "rule": "documents",
            "n_train_docs": n_docs - n_val_docs,
            "n_val_docs": n_val_docs,
        }
    split_at = len(tokens) - max(1, round(val_fraction * len(tokens)))
    return split_at, {"rule": "tokens"}


def _build(entry: Path, key: str, corpus: Corpus, tokenizer_id: dict, cfg: DataConfig) -> dict:
    """Tokenize, split and write a cache entry; returns its meta."""
    tok, tok_info = build_tokenizer(tokenizer_id, corpus.docs, corpus.sha256, entry.parent)
    tokens, starts = _tokenize(corpus, tok)
    truncated = cfg.max_tokens is not None and len(tokens) > cfg.max_tokens
    if truncated:
        tokens = tokens[: cfg.max_tokens]
        starts = starts[starts < len(tokens)]
    split_at, split_info = _split(tokens, starts, cfg.val_fraction)
    dtype = _dtype(tok.vocab_size)
    meta = {
        "format": CACHE_FORMAT,
        "cache_key": key,
        "corpus": {
            "source": corpus.source,
            "name": corpus.name,
            "licence": corpus.licence,
            "n_docs": len(starts),
            "n_bytes": corpus.n_bytes,
            "sha256": corpus.sha256,
            "max_docs": effective_max_docs(cfg),
            "max_tokens": cfg.max_tokens,
            "truncated_to_max_tokens": truncated,
            "notes": corpus.notes,
        },
        "tokenizer": tok_info,
        "split": {**split_info, "val_fraction": cfg.val_fraction},
        "dtype": dtype.name,
        "n_train_tokens": split_at,
        "n_val_tokens": len(tokens) - split_at,
    }
    # written to a temp dir renamed into place at the end: an entry that exists is complete
    tmp = entry.parent / f".{key}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        tokens[:split_at].astype(dtype).tofile(tmp / "train.bin")
        tokens[split_at:].astype(dtype).tofile(tmp / "val.bin")
        if tok.kind != "bytes":
            (tmp / "tokenizer.json").write_text(tok.to_json(), encoding="utf-8")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        os.rename(tmp, entry)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if _read_meta(entry) is None:  # not a concurrent writer that got there first
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _read_meta(entry: Path) -> dict | None:
    """An entry's meta if the entry is complete and consistent, else None."""
    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        itemsize = np.dtype(meta["dtype"]).itemsize
        sizes_ok = all(
            (entry / f"{s}.bin").stat().st_size == meta[f"n_{s}_tokens"] * itemsize
            for s in ("train", "val")
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta if sizes_ok and meta.get("format") == CACHE_FORMAT else None


def _check_sizes(meta: dict, seq_len: int) -> None:
    need = seq_len + 1
    for split, hint in (("train", ""), ("val", ", or a larger data.val_fraction")):
        have = meta[f"n_{split}_tokens"]
        if have < need:
            raise UserError(
                f"the {split} split has {have} tokens but one sequence needs seq_len+1 = {need}; "
                f"use more text or a smaller data.seq_len{hint}"
            )


def prepare_data(cfg: DataConfig) -> PreparedData:
    """Load, tokenize and cache the corpus (or reuse the cache) and map the token streams."""
    cfg.validate()
    root = cache_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer_id = tokenizer_identity(cfg.tokenizer, cfg.vocab_size)
    corpus = None
    if cfg.source.startswith(HUB_PREFIX):
        # keyed by the request, not the content: a cached hub corpus needs no network to reuse
        corpus_id: dict = {"hub": cfg.source, "split": cfg.split, "text_field": cfg.text_field}
    elif cfg.source == PROSE:
        # keyed by its build manifest: a token cache carried without the text is still found
        corpus_id = {"prose": hashlib.sha256(prose_manifest(root)[1]).hexdigest()}
    else:
        corpus = load_corpus(cfg, root / "hf-datasets")
        corpus_id = {"sha256": corpus.sha256}
    key = _cache_key(corpus_id, tokenizer_id, cfg)
    entry = root / key
    meta = _read_meta(entry)
    if meta is None:
        if entry.exists():
            log.warning("data: discarding incomplete cache entry %s", entry)
            shutil.rmtree(entry)
        if corpus is None:
            corpus = load_corpus(cfg, root / "hf-datasets")
        log.info("data: tokenizing %s into %s", cfg.source, entry)
        meta = _build(entry, key, corpus, tokenizer_id, cfg)
    else:
        log.info("data: reusing token cache %s", entry)
    _check_sizes(meta, cfg.seq_len)
    dtype = np.dtype(meta["dtype"])
    streams = {
        s: np.memmap(entry / f"{s}.bin", dtype=dtype, mode="r", shape=(meta[f"n_{s}_tokens"],))
        for s in ("train", "val")
    }
    tok = load_cached_tokenizer(meta["tokenizer"]["kind"], entry / "tokenizer.json")
    info = {
        **meta,
        "cache_dir": str(entry),
        "seq_len": cfg.seq_len,
        "n_train_sequences": n_windows(meta["n_train_tokens"], cfg.seq_len),
        "n_val_sequences": n_windows(meta["n_val_tokens"], cfg.seq_len),
    }
    return PreparedData(
        train=streams["train"],
        val=streams["val"],
        vocab_size=meta["tokenizer"]["vocab_size"],
        eot_id=meta["tokenizer"]["eot_id"],
        tokenizer=tok,
        info=info,
        seq_len=cfg.seq_len,
    )
