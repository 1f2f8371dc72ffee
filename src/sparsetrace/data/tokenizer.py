"""Tokenizers: byte-level BPE trained on the corpus, raw bytes, a tokenizer.json, or the hub."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import numpy as np
import tokenizers

from sparsetrace.data.sources import HUB_PREFIX
from sparsetrace.errors import UserError

EOT = "<|endoftext|>"
# end-of-text tokens of common pretrained tokenizers, tried in order before adding EOT
_EOT_CANDIDATES = (EOT, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
_SPEC_HELP = "expected 'bpe', 'bytes', 'hf:NAME' or a path to a tokenizer.json"


class HFTokenizer:
    """A `tokenizers.Tokenizer` with a known end-of-text id."""

    def __init__(self, tok: tokenizers.Tokenizer, kind: str) -> None:
        self.tok = tok
        self.kind = kind
        vocab = tok.get_vocab(with_added_tokens=True)
        eot = next((t for t in _EOT_CANDIDATES if t in vocab), None)
        if eot is None:
            tok.add_special_tokens([tokenizers.AddedToken(EOT, special=True)])
            vocab = tok.get_vocab(with_added_tokens=True)
            eot = EOT
        self.eot_id = vocab[eot]
        # ids may have gaps; the embedding table must cover the largest one
        self.vocab_size = max(vocab.values()) + 1

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        encs = self.tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.uint32) for e in encs]

    def to_json(self) -> str:
        return self.tok.to_str()


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, end-of-text 256."""

    kind = "bytes"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        out, run = [], bytearray()
        for i in ids:
            if i == self.eot_id:
                out.append(run.decode("utf-8", errors="replace") + EOT)
                run = bytearray()
            else:
                run.append(i)
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.uint32) for t in texts]


Tokenizer = HFTokenizer | ByteTokenizer


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tokenizer_identity(spec: str, vocab_size: int) -> dict:
    """What determines the token ids besides the corpus; raises UserError for a bad spec."""
    if spec == "bpe":
        return {"kind": "bpe", "vocab_size": vocab_size}
    if spec == "bytes":
        return {"kind": "bytes"}
    if spec.startswith(HUB_PREFIX):
        return {"kind": "hf", "name": spec[len(HUB_PREFIX) :]}
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UserError(f"unknown tokenizer '{spec}': {_SPEC_HELP} (no such file)")
    return {
        "kind": "file",
        "path": str(path.absolute()),
        "sha256": _sha256_bytes(path.read_bytes()),
    }


def train_bpe(docs: list[str], vocab_size: int) -> tokenizers.Tokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenization) with EOT as its only special token."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        # all 256 bytes, so that any text round-trips even if the corpus lacks some bytes
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return tok


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file and rename, so a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _from_file(path: Path, kind: str) -> HFTokenizer:
    try:
        return HFTokenizer(tokenizers.Tokenizer.from_file(str(path)), kind)
    except Exception as e:  # tokenizers raises plain Exception for malformed JSON/models
        raise UserError(f"corrupt tokenizer file {path}: {str(e)[:200]}") from None


def build_tokenizer(
    identity: dict, docs: list[str], corpus_sha256: str, cache_root: Path
) -> tuple[Tokenizer, dict]:
    """The tokenizer for `identity` and a JSON-serialisable description of it."""
    kind = identity["kind"]
    info: dict = {"kind": kind}
    if kind == "bytes":
        tok: Tokenizer = ByteTokenizer()
    elif kind == "bpe":
        path = (
            cache_root / "tokenizers" / f"bpe-v{identity['vocab_size']}-{corpus_sha256[:16]}.json"
        )
        if not path.is_file():
            atomic_write_text(path, train_bpe(docs, identity["vocab_size"]).to_str())
        tok = _from_file(path, kind)
        info["path"] = str(path)
    elif kind == "hf":
        try:
            raw = tokenizers.Tokenizer.from_pretrained(identity["name"])
        except Exception as e:  # connection errors, missing repos, missing tokenizer.json
            raise UserError(
                f"could not load tokenizer '{identity['name']}' from the Hugging Face hub "
                f"(no network?): {type(e).__name__}: {str(e).strip()[:200]}"
            ) from None
        tok = HFTokenizer(raw, kind)
        info["name"] = identity["name"]
    else:
        tok = _from_file(Path(identity["path"]), kind)
        info["path"] = identity["path"]
    if isinstance(tok, HFTokenizer):
        info["sha256"] = _sha256_bytes(tok.to_json().encode("utf-8"))
    info.update(vocab_size=tok.vocab_size, eot_id=tok.eot_id)
    return tok, info


def load_cached_tokenizer(kind: str, path: Path) -> Tokenizer:
    """The tokenizer stored alongside a token cache entry."""
    return ByteTokenizer() if kind == "bytes" else _from_file(path, kind)
