"""Sensitivity sweeps (paper 5) and capacity round 2 (paper 4.4): arms, grids, resume, widths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sparsetrace.config import load_config
from sparsetrace.errors import UserError
from sparsetrace.experiments import capacity, runs, sweep
from sparsetrace.rundir import load_run

SHORT = ["--train.steps", "10", "--eval.every", "5", "--checkpoint.every", "5"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch) -> None:
    monkeypatch.setenv("SPARSETRACE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _no_training(*_args, **_kwargs) -> None:
    raise AssertionError("a finished arm was trained again")


def test_parse_sweep_and_typed_arms(tmp_path: Path) -> None:
    dims = sweep.parse_sweep("train.lr=1e-3, 2e-3;model.d_ff_per_layer=[8,16],[16, 8]")
    assert dims == [("train.lr", ["1e-3", "2e-3"]),
                    ("model.d_ff_per_layer", ["[8,16]", "[16, 8]"])]  # fmt: skip
    arms = sweep.build_arms("tiny", [], dims, tmp_path)
    assert [a.values for a in arms] == [
        {"train.lr": 0.001, "model.d_ff_per_layer": [8, 16]},
        {"train.lr": 0.001, "model.d_ff_per_layer": [16, 8]},
        {"train.lr": 0.002, "model.d_ff_per_layer": [8, 16]},
        {"train.lr": 0.002, "model.d_ff_per_layer": [16, 8]},
    ]  # the grid, values typed by the config ("1e-3" is a float, lists are lists)
    assert arms[1].cfg.run_name == "train.lr=0.001+model.d_ff_per_layer=[16,8]"
    assert arms[1].cfg.model.widths == [16, 8] and arms[1].cfg.out_dir == str(tmp_path)
    (arm,) = sweep.build_arms("tiny", [], sweep.parse_sweep("--model.n_layers=3"), tmp_path)
    assert arm.values == {"model.n_layers": 3} and isinstance(arm.values["model.n_layers"], int)


def test_sweep_input_errors(tmp_path: Path) -> None:
    with pytest.raises(
        UserError, match=r"unknown config key train\.lrr; valid keys of train: .*lr"
    ):
        sweep.build_arms("tiny", [], sweep.parse_sweep("train.lrr=1,2"), tmp_path)
    with pytest.raises(UserError, match="unknown config key modle; valid keys: model, data"):
        sweep.build_arms("tiny", [], sweep.parse_sweep("modle.d_ff=1"), tmp_path)
    with pytest.raises(UserError, match="expected a number"):
        sweep.build_arms("tiny", [], sweep.parse_sweep("train.lr=fast"), tmp_path)
    with pytest.raises(UserError, match=r"same arm train\.lr=0\.001"):
        sweep.build_arms("tiny", [], sweep.parse_sweep("train.lr=1e-3,0.001"), tmp_path)
    for bad in ("train.lr", "=1,2", "train.lr=", "train.lr=1,,2", "a.b=1;a.b=2"):
        with pytest.raises(UserError, match="--sweep"):
            sweep.parse_sweep(bad)
    with pytest.raises(UserError, match="either --sweep"):
        sweep.run_sweep("tiny", "", "", -1, False, False, tmp_path, None)
    with pytest.raises(UserError, match="either --sweep"):
        sweep.run_sweep("tiny", "train.lr=1", "lr", -1, False, False, tmp_path, None)
    with pytest.raises(UserError, match="unknown sweep name 'batch'; choose one of lr, width"):
        sweep.run_sweep("tiny", "", "batch", -1, False, False, tmp_path, None)
    with pytest.raises(UserError, match=r"--arm must be an arm index 0-3"):
        sweep.run_sweep("tiny", "", "lr", 4, False, False, tmp_path, None)


def test_named_sweeps_scale_the_papers_grids() -> None:
    cpu = load_config("cpu")  # lr 3e-3 (the paper's), d_ff 2048, 6 layers (the paper's)
    assert sweep.named_sweep("lr", cpu) == (
        [("train.lr", ["0.001", "0.002", "0.003", "0.005"])],
        [],
    )
    assert sweep.named_sweep("width", cpu) == ([("model.d_ff", ["512", "1024", "2048"])], [])
    assert sweep.named_sweep("depth", cpu) == (
        [("model.n_layers", ["6", "10", "14"])],
        ["--model.d_ff", "1024"],
    )
    tiny = load_config("tiny")  # d_ff 128, 2 layers
    assert sweep.named_sweep("width", tiny)[0] == [("model.d_ff", ["32", "64", "128"])]
    assert sweep.named_sweep("depth", tiny) == ([("model.n_layers", ["2", "3", "5"])],
                                                ["--model.d_ff", "64"])  # fmt: skip
    quick = load_config("cpu", runs.base_overrides(True, None))  # --quick: peak LR 1e-2
    assert sweep.named_sweep("lr", quick)[0] == [
        ("train.lr", ["0.00333333", "0.00666667", "0.01", "0.0166667"])
    ]


@pytest.mark.slow
def test_sweep_arms_one_at_a_time_then_report(tmp_path: Path, monkeypatch, capsys) -> None:
    args = ("tiny", "train.lr=1e-3,3e-3", "", 1, False, False, tmp_path, SHORT)
    assert sweep.run_sweep(*args) is None  # only arm 1, as one process of an array job would
    sweep.run_sweep("tiny", "train.lr=1e-3,3e-3", "", -1, True, False, tmp_path, SHORT)
    listing = capsys.readouterr().out.splitlines()[-2:]
    assert listing == ["0\tpending\ttrain.lr=0.001", "1\tfinished\ttrain.lr=0.003"]
    index = sweep.run_sweep("tiny", "train.lr=1e-3,3e-3", "", -1, False, False, tmp_path, SHORT)
    assert "train.lr=0.003: finished" in capsys.readouterr().out  # not retrained
    table5 = pd.read_csv(tmp_path / "report/tables/table5.csv", index_col=0)
    # An LR sweep shows the paper's Table 5 beside it (6 layers, LRs 1e-3 to 5e-3).
    assert list(table5.index) == ["0", "1", "2", "3", "4", "5", "total"]
    assert table5.loc["total", "paper (Table 5): LR=0.003"] == 69.7
    for label in ("train.lr=0.001", "train.lr=0.003"):
        sp = load_run(tmp_path / label).sparsity
        end = sp[sp.step == 9]
        column = f"this sweep: {label}"
        assert table5.loc["0", column] == pytest.approx(100 * end.per_batch_frac.iloc[0])
        # The total weighs layers by their units (equal widths here: the mean).
        assert table5.loc["total", column] == pytest.approx(100 * end.per_batch.sum() / 256)
    assert (tmp_path / "report/runs/index.html").exists() and index.exists()
    monkeypatch.setattr(runs, "train", _no_training)
    monkeypatch.setattr(sweep, "write_report", lambda *_: index)  # written and checked above
    sweep.run_sweep("tiny", "train.lr=0.001,0.003", "", -1, False, False, tmp_path, SHORT)
    with pytest.raises(UserError, match="another experiment"):
        sweep.run_sweep("tiny", "train.lr=1e-3,2e-3", "", -1, False, False, tmp_path, SHORT)


@pytest.mark.slow
def test_capacity_round2_widths_are_round1_use(tmp_path: Path, monkeypatch) -> None:
    capacity.run_capacity_experiment("tiny", 2, False, tmp_path, SHORT)
    ends = []
    for seed in (0, 1):
        sp = load_run(tmp_path / f"round1-seed{seed}").sparsity
        ends.append(sp[sp.step == 9].sort_values("layer").per_batch.to_numpy())  # last measured
    widths = [max(1, round(v)) for v in np.mean(ends, axis=0)]
    round1 = [tmp_path / f"round1-seed{s}" for s in (0, 1)]
    assert widths == capacity.round2_widths(round1)
    for seed in (0, 1):
        round2 = load_run(tmp_path / f"round2-seed{seed}")
        assert round2.meta["model"]["d_ff"] == widths and round2.meta["status"] == "finished"
        assert round2.config["train"]["seed"] == seed
    assert set(load_run(tmp_path / "round2-seed0").sparsity.hidden) == set(widths)
    assert min(widths) < 128
    table4 = pd.read_csv(tmp_path / "report/tables/table4.csv", index_col=0)
    assert list(table4["round 2: width"].iloc[:2]) == widths
    assert table4["paper (Table 4): round 1 used"].iloc[0] == 7455
    # Used % is the mean over seeds of each seed's own share.
    share = np.mean([100 * e[0] / 128 for e in ends])
    assert table4["round 1: used (%)"].iloc[0] == pytest.approx(share)
    claims = pd.read_csv(tmp_path / "report/tables/capacity_claims.csv", index_col=0)
    paper, run = claims.iloc[0]["paper"], claims.iloc[1]["this experiment"]
    assert paper.startswith("holds")  # Table 4's largest per-layer gap is 4.7 pp
    assert run.split(":")[0] in {"holds", "does not hold", "inconclusive"} and "CI" in run
    monkeypatch.setattr(runs, "train", _no_training)
    monkeypatch.setattr(capacity, "write_report", lambda *_: None)  # written and checked above
    capacity.run_capacity_experiment("tiny", 2, False, tmp_path, SHORT)
    with pytest.raises(UserError, match=r"trace\.every must be positive"):
        capacity.run_capacity_experiment("tiny", 1, False, tmp_path / "x", ["--trace.every", "0"])
    with pytest.raises(UserError, match="seeds"):
        capacity.run_capacity_experiment("tiny", 0, False, tmp_path / "y", SHORT)
