"""Data configuration and the cache location."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sparsetrace.errors import UserError

CACHE_ENV = "SPARSETRACE_CACHE"


@dataclass
class DataConfig:
    """Where the text comes from, how it is tokenized, and how it is packed."""

    # "embedded" | "prose" (built into the cache by scripts/build_prose_corpus.py) |
    # a .txt/.jsonl/.parquet file or a directory of them | "hf:NAME[:CONFIG]"
    source: str = "embedded"
    text_field: str = "text"  # field for jsonl/parquet/hf rows
    split: str = "train"  # hub split
    max_docs: int | None = None  # cap on documents (hub sources default to HUB_DEFAULT_MAX_DOCS)
    max_tokens: int | None = None  # cap on total tokens, train + val
    # "bpe" (trained on the corpus, cached) | "bytes" | path to a tokenizer.json | "hf:NAME"
    tokenizer: str = "bpe"
    vocab_size: int = 4096  # for bpe
    seq_len: int = 128
    val_fraction: float = 0.05
    cache_dir: str = ".cache/sparsetrace"  # relative to the CWD; SPARSETRACE_CACHE overrides

    def validate(self) -> None:
        """Raise UserError for settings no source could satisfy."""
        if self.seq_len < 1:
            raise UserError(f"data.seq_len must be >= 1, got {self.seq_len}")
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.max_docs is not None and self.max_docs < 1:
            raise UserError(f"data.max_docs must be >= 1 or null, got {self.max_docs}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise UserError(f"data.max_tokens must be >= 1 or null, got {self.max_tokens}")
        if self.tokenizer == "bpe" and self.vocab_size < 257:
            # 256 byte symbols + <|endoftext|> is the smallest byte-level BPE vocabulary
            raise UserError(f"data.vocab_size must be >= 257 for bpe, got {self.vocab_size}")


def cache_root(cfg: DataConfig) -> Path:
    """The cache directory: $SPARSETRACE_CACHE if set, else cfg.cache_dir (relative to the CWD)."""
    raw = os.environ.get(CACHE_ENV) or cfg.cache_dir
    return Path(raw).expanduser().absolute()
