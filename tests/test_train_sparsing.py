"""Sparsing Law PPL-p% recorded during training (trace.sparsing_every) vs the same measurement
made afterwards on the saved checkpoint."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from sparsetrace.checkpoint import checkpoint_path, load_trained_model
from sparsetrace.config import load_config
from sparsetrace.data import prepare_data
from sparsetrace.sparsing.search import Subject, ppl_sparsity
from sparsetrace.sparsing.source import validation_batches
from sparsetrace.train.loop import train


def test_recorded_during_training_equals_post_hoc(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SPARSETRACE_CACHE", str(tmp_path / "cache"))
    overrides = ["--out_dir", str(tmp_path), "--trace.sparsing_every", "10",
                 "--trace.sparsing_cett", "0.2", "--trace.sparsing_tokens", "1024"]  # fmt: skip
    cfg = load_config("tiny", overrides)
    run = train(cfg)
    rows = pd.read_csv(run / "sparsing_train.csv")
    assert sorted(rows.step.unique()) == [10, 20]
    assert set(rows.layer.astype(str)) == {"all", "0", "1"}
    for step in (10, 20):
        model, run_cfg = load_trained_model(run, checkpoint_path(run, step))
        batches = validation_batches(prepare_data(run_cfg.data).val, run_cfg.data.seq_len, 1024)
        expected = Subject(model, batches).measure(0.2)
        got = rows[(rows.step == step) & (rows.layer.astype(str) == "all")].iloc[0]
        assert got.activation_ratio == pytest.approx(expected.activation_ratio, rel=1e-6)
        assert got.ppl_ratio == pytest.approx(expected.ppl_ratio, rel=1e-6)
        assert got.tokens == step * run_cfg.train.batch_size * run_cfg.data.seq_len


def test_searched_cett_meets_the_ppl_target(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SPARSETRACE_CACHE", str(tmp_path / "cache"))
    cfg = load_config("tiny", ["--out_dir", str(tmp_path), "--trace.sparsing_every", "20",
                               "--trace.sparsing_tokens", "1024"])  # fmt: skip
    run = train(cfg)
    rows = pd.read_csv(run / "sparsing_train.csv")
    overall = rows[rows.layer.astype(str) == "all"].iloc[0]
    assert overall.ppl_ratio == pytest.approx(1.01, abs=2e-3)  # PPL-1%: perplexity +1%
    # the same search, done afterwards on the checkpoint of that step, finds the same ratio
    model, run_cfg = load_trained_model(run, checkpoint_path(run, 20))
    batches = validation_batches(prepare_data(run_cfg.data).val, run_cfg.data.seq_len, 1024)
    again = ppl_sparsity(Subject(model, batches), 1.0).measurement
    assert overall.activation_ratio == pytest.approx(again.activation_ratio, rel=1e-6)
    assert overall.ppl_ratio == pytest.approx(again.ppl_ratio, rel=1e-6)
