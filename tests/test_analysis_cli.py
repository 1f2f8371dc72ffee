"""``sparsetrace analyze``: a checkpoint series saved from a short training loop, a single model
directory, a sparsetrace run and an unreachable hub id, each to a run directory the report reads."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModel, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from sparsetrace.analysis import trace, verbs
from sparsetrace.analysis.analyze import analyze_model
from sparsetrace.config import load_config
from sparsetrace.data.tokenizer import EOT, train_bpe
from sparsetrace.errors import UserError
from sparsetrace.report import write_report
from sparsetrace.rundir import load_run
from sparsetrace.series import ModelTokenizer, token_batches
from sparsetrace.train.loop import train

FF, BATCH, SEQ = 64, 4, 16
TOKENS = 3 * BATCH * SEQ  # three batches per revision
WORDS = ["the", "a", "of", "to", "and", "in", "is", "was", "he", "she", "it", "that"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARSETRACE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    words = WORDS + [f"w{i}" for i in range(60)]
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choices(words, k=12)) for _ in range(800)))
    return path


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory, text: Path) -> Path:
    """A tiny ReLU GPT-2 saved after 0, 2 and 4 updates (step0, checkpoint-2, step4), with a
    BPE tokenizer trained offline, saved in the series directory and in step4."""
    root = tmp_path_factory.mktemp("series")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=train_bpe([text.read_text()], 300), eos_token=EOT
    )
    tok.save_pretrained(root)
    torch.manual_seed(0)
    eot = tok.eos_token_id
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_inner=FF, n_positions=64,
                        activation_function="relu", vocab_size=len(tok), bos_token_id=eot,
                        eos_token_id=eot)  # fmt: skip
    model = GPT2LMHeadModel(config)
    stream = torch.tensor(tok(text.read_text())["input_ids"][:4096])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(5):
        if step in (0, 2, 4):
            model.save_pretrained(root / ("checkpoint-2" if step == 2 else f"step{step}"))
        batch = stream[step * 256 : (step + 1) * 256].view(8, 32)
        model(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    tok.save_pretrained(root / "step4")
    return root


@pytest.mark.slow
def test_series_to_run_directory_and_report(series: Path, text: Path, tmp_path: Path) -> None:
    out = analyze_model(str(series), data=str(text), tokens=TOKENS, batch_size=BATCH,
                        seq_len=SEQ, out=tmp_path / "a")  # fmt: skip
    run = load_run(out)
    assert run.missing == []
    s = run.sparsity
    assert list(s.step) == [0, 0, 2, 2, 4, 4] and list(s.layer) == [0, 1] * 3
    assert (s.tokens == s.step).all() and (s.scope == "device").all() and (s.hidden == FF).all()
    assert ((s.per_token <= s.per_sequence) & (s.per_sequence <= s.per_batch)).all()
    meta = run.meta
    assert meta["kind"] == "analysis" and meta["status"] == "finished" and meta["step"] == 4
    assert meta["model"]["architecture"] == "gpt2" and meta["model"]["d_ff"] == [FF, FF]
    assert meta["model"]["activation"] == "relu" and meta["model"]["n_layers"] == 2
    assert meta["analysis"]["tokens_analysed"] == TOKENS and meta["analysis"]["batches"] == 3
    assert meta["train"]["batch_size"] == BATCH and meta["train"]["seq_len"] == SEQ
    labels = [r["label"] for r in meta["analysis"]["revisions"]]
    assert labels == ["step0", "checkpoint-2", "step4"]
    assert run.config["kind"] == "analysis"
    life = run.lifecycle["layers"]
    assert [t[0] for t in life["0"]["transitions"]] == [0, 2, 4]

    # The same numbers as tracing the last revision directly on the same batches.
    model = AutoModel.from_pretrained(series / "step4").eval()
    tokenizer = ModelTokenizer(PreTrainedTokenizerFast.from_pretrained(series))
    batches, _ = token_batches(str(text), tokenizer, 3, BATCH, SEQ)
    with torch.no_grad(), trace(model) as t:
        for batch in batches:
            model(batch)
    direct = t.summary(aggregate=True)
    last = s[s.step == 4].reset_index()
    for col in ("per_token", "per_sequence", "per_batch", "p50", "token_seq_ratio"):
        assert list(last[col]) == pytest.approx(list(direct[col]), rel=1e-6)
    # Lifecycle: the first batch of each revision.
    first = t.first_batch_used["blocks.0.mlp.hidden"]
    assert life["0"]["summary"]["final_use"] == pytest.approx(float(first.float().mean()))

    index = write_report([out], tmp_path / "report")
    assert Path(index).exists()


def test_verb_prints_summary_and_selects_revisions(
    series: Path, text: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "b"
    verbs.analyze(str(series), revisions="checkpoint-2, 4", data=str(text), tokens=TOKENS,
                  batch_size=BATCH, seq_len=SEQ, out=out)  # fmt: skip
    printed = capsys.readouterr().out
    assert "gpt2, 2 MLPs, measured: down-projection input" in printed
    assert f"run directory: {out}" in printed
    assert sorted(load_run(out).sparsity.step.unique()) == [2, 4]


def test_single_model_directory(series: Path, text: Path, tmp_path: Path) -> None:
    out = analyze_model(str(series / "step4"), data=str(text), tokens=TOKENS, batch_size=BATCH,
                        seq_len=SEQ, out=tmp_path / "c")  # fmt: skip
    run = load_run(out)
    assert list(run.sparsity.step) == [0, 0]
    assert run.meta["model"]["kind"] == "model directory"
    with pytest.raises(UserError, match="single model"):
        analyze_model(str(series / "step4"), revisions=["step1"], out=tmp_path / "d")
    # No tokenizer in the directory: a clear error.
    with pytest.raises(UserError, match="no tokenizer files"):
        analyze_model(str(series / "step0"), data=str(text), out=tmp_path / "e")


def test_bad_input_is_a_user_error(series: Path, text: Path, tmp_path: Path) -> None:
    def run(model: Path = series, **kw: object) -> Path:
        args = {"data": str(text), "tokens": TOKENS, "batch_size": BATCH, "seq_len": SEQ,
                "out": tmp_path / "x", **kw}  # fmt: skip
        return analyze_model(str(model), **args)

    cases = [
        ({"seq_len": 128}, "context of 64"),
        ({"gated": "gate"}, "not gated"),
        ({"gated": "sum"}, "gated must be"),
        ({"tokens": 10**6}, "gives .* tokens"),
        ({"batch_size": 0}, "batch-size must be"),
        ({"revisions": ["step3"]}, "no revision step3"),
        ({"model": tmp_path}, "neither a model directory"),
    ]
    for kw, match in cases:
        with pytest.raises(UserError, match=match):
            run(**kw)
    assert not (tmp_path / "x" / "sparsity.csv").exists()
    (tmp_path / "x").mkdir(exist_ok=True)
    (tmp_path / "x" / "file").write_text("")
    with pytest.raises(UserError, match="not empty"):
        run()


def test_hub_id_without_network_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(UserError, match="hub is unreachable"):
        analyze_model("sparsetrace-tests/no-such-model", revisions=["step1000"],
                      out=tmp_path / "hub")  # fmt: skip
    assert time.monotonic() - start < 20
    assert not (tmp_path / "hub").exists()


def test_sparsetrace_run_directory_as_model(tmp_path: Path) -> None:
    cfg = load_config("tiny", ["--out_dir", str(tmp_path), "--run_name", "r",
                               "--train.threads", "1", "--trace.every", "0"])  # fmt: skip
    run_dir = train(cfg)
    out = analyze_model(str(run_dir), tokens=2 * 4 * 32, batch_size=4, seq_len=32,
                        out=tmp_path / "analysis")  # fmt: skip
    run = load_run(out)
    per_step = load_run(run_dir).meta["train"]["tokens_per_step"]
    assert list(run.sparsity.step) == [10, 10, 20, 20]
    assert list(run.sparsity.tokens) == [10 * per_step] * 2 + [20 * per_step] * 2
    assert run.meta["model"]["architecture"] == "sparsetrace"
    assert run.meta["model"]["d_ff"] == [128, 128] and run.meta["model"]["activation"] == "relu"
    assert run.meta["train"]["tokens_per_step"] == per_step
    # Each checkpoint's numbers equal tracing it directly on the same batches.
    from sparsetrace.checkpoint import checkpoint_step, list_checkpoints, load_trained_model
    from sparsetrace.series import resolve

    batches, _ = token_batches("embedded", resolve(str(run_dir)).tokenizer, 2, 4, 32)
    for ckpt in list_checkpoints(run_dir):
        model = load_trained_model(run_dir, ckpt)[0].float()
        with torch.no_grad(), trace(model) as t:
            for batch in batches:
                model(batch)
        direct = t.summary(aggregate=True)
        got = run.sparsity[run.sparsity.step == checkpoint_step(ckpt)]
        for col in ("per_token", "per_sequence", "per_batch", "p50"):
            assert list(got[col]) == pytest.approx(list(direct[col]), rel=1e-6), col
    index = write_report([out], tmp_path / "report")
    table = pd.read_csv(index.parent / "tables" / "table1.csv", index_col="layer")
    [column] = [c for c in table.columns if c.endswith(": per-batch (%)") and "paper" not in c]
    end = run.sparsity[run.sparsity.step == 20].set_index("layer")
    assert table.loc[end.index, column].tolist() == pytest.approx(
        (100 * end["per_batch_frac"]).tolist()
    )


def test_series_frees_each_revision_before_loading_the_next(
    series: Path, text: Path, tmp_path: Path, model_loads: Callable[[], list[int]]
) -> None:
    """Memory stays flat over a series: when a revision loads, no earlier one is alive."""
    analyze_model(str(series), data=str(text), tokens=TOKENS, batch_size=BATCH, seq_len=SEQ,
                  out=tmp_path / "m")  # fmt: skip
    assert model_loads() == [0, 0, 0]


def test_layers_selection_on_the_command_line(series: Path, text: Path, tmp_path: Path) -> None:
    kw = {"data": str(text), "tokens": TOKENS, "batch_size": BATCH, "seq_len": SEQ}
    full = load_run(analyze_model(str(series), out=tmp_path / "all", **kw)).sparsity
    verbs.analyze(str(series), layers="1", out=tmp_path / "one", **kw)
    one = load_run(tmp_path / "one").sparsity
    assert list(one.layer.unique()) == [1]
    cols = ["step", "per_token", "per_sequence", "per_batch", "p50"]
    expected = full[full.layer == 1][cols].reset_index(drop=True)
    pd.testing.assert_frame_equal(one[cols].reset_index(drop=True), expected, check_dtype=False)
    verbs.analyze(str(series), layers=r"blocks\.0\.", out=tmp_path / "regex", **kw)
    assert list(load_run(tmp_path / "regex").sparsity.layer.unique()) == [0]
    with pytest.raises(UserError, match=r"selects none|unknown"):
        verbs.analyze(str(series), layers="7", out=tmp_path / "bad", **kw)
    assert not (tmp_path / "bad").exists()  # nothing written for a bad selection


def test_device_map_model_with_offloaded_layers_equals_the_plain_model(
    series: Path, text: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """accelerate: a model whose second block lives on disk (loaded into the forward pass by
    accelerate's hooks) is measured exactly like the same model in memory."""
    pytest.importorskip("accelerate")
    from accelerate import dispatch_model
    from accelerate.utils import offload_state_dict

    model = AutoModel.from_pretrained(series / "step4").eval()
    tokenizer = ModelTokenizer(PreTrainedTokenizerFast.from_pretrained(series))
    batches, _ = token_batches(str(text), tokenizer, 3, BATCH, SEQ)

    def summary(m):
        with torch.no_grad(), trace(m) as t:
            for batch in batches:
                m(batch)
        return t.summary(aggregate=True)

    plain = summary(model)
    placed = AutoModel.from_pretrained(series / "step4").eval()
    device_map = {"wte": "cpu", "wpe": "cpu", "drop": "cpu", "h.0": "cpu", "h.1": "disk",
                  "ln_f": "cpu"}  # fmt: skip
    offload = tmp_path / "offload"
    offload_state_dict(
        offload, {k: v for k, v in placed.state_dict().items() if k.startswith("h.1.")}
    )
    placed = dispatch_model(placed, device_map=device_map, offload_dir=str(offload))
    assert placed.h[1].mlp.c_fc.weight.device.type == "meta"  # really offloaded
    off = summary(placed)
    for col in ("per_token", "per_sequence", "per_batch", "p50"):
        assert list(off[col]) == pytest.approx(list(plain[col]), rel=1e-6)
    # and through the verb, with transformers' own device_map loading
    kw = {"data": str(text), "tokens": TOKENS, "batch_size": BATCH, "seq_len": SEQ}
    import sparsetrace.series as model_series

    real, asked = model_series.from_pretrained, []

    def spy(*args, **kwargs):
        asked.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(model_series, "from_pretrained", spy)
    verbs.analyze(str(series / "step4"), device_map="cpu", out=tmp_path / "dm", **kw)
    assert {"device_map": "cpu"} in asked  # reached transformers' from_pretrained
    run = load_run(tmp_path / "dm")
    assert run.meta["analysis"]["device_map"] == "cpu"
    assert list(run.sparsity.per_batch) == pytest.approx(list(plain.per_batch))
