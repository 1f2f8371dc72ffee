"""The main job's wiring: `sparsetrace run` trains, writes the report, prints the summary, and a
second run never overwrites the first."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from sparsetrace.cli import main
from sparsetrace.rundir import load_run


@pytest.mark.slow
def test_run_trains_reports_and_never_overwrites(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("SPARSETRACE_CACHE", str(tmp_path / "cache"))
    args = ["run", "--preset", "tiny", "--out_dir", str(tmp_path), "--train.steps", "10",
            "--checkpoint.every", "5"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"report: {tmp_path / 'tiny' / 'report' / 'index.html'}" in out
    assert "corr(per-token, per-batch)" in out  # the terminal summary of Tables 1-2
    assert (tmp_path / "tiny" / "report" / "index.html").is_file()
    run = load_run(tmp_path / "tiny")
    assert run.meta["status"] == "finished"
    # the report's Table 1 is the run's device-scope use at its last measured step, in %
    table = pd.read_csv(tmp_path / "tiny" / "report" / "tables" / "table1.csv", index_col="layer")
    device = run.sparsity[run.sparsity["scope"] == "device"]
    end = device[device["step"] == device["step"].max()].set_index("layer")
    for metric in ("per-token", "per-batch"):
        [column] = [c for c in table.columns if c.endswith(f": {metric} (%)") and "paper" not in c]
        frac = end[f"{metric.replace('-', '_')}_frac"]
        assert table.loc[end.index, column].tolist() == pytest.approx((100 * frac).tolist())
    # the main job's Sparsing Law section: every checkpoint at the c found on the final one
    law = json.loads((tmp_path / "tiny" / "sparsing_law.json").read_text())
    assert [c["step"] for c in law["checkpoints"]] == [5, 10]
    assert law["search"]["checkpoints"] == [10]
    assert (
        "Sparsing Law: PPL-1% sparsity" in (tmp_path / "tiny" / "report" / "report.md").read_text()
    )
    assert main(args) == 0
    assert f"run directory: {tmp_path / 'tiny-2'}" in capsys.readouterr().out
    assert load_run(tmp_path / "tiny").meta["status"] == "finished"  # the first run is untouched


@pytest.mark.slow
def test_run_writes_its_report_when_the_sparsing_law_step_fails(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """A bug in the Sparsing Law step is raised (not hidden), after the trained run's report is
    written; bad input there (UserError) only skips the section."""
    import pytest

    from sparsetrace.errors import UserError
    from sparsetrace.sparsing import over_training

    monkeypatch.setenv("SPARSETRACE_CACHE", str(tmp_path / "cache"))
    args = ["run", "--preset", "tiny", "--out_dir", str(tmp_path), "--train.steps", "4",
            "--checkpoint.every", "2"]  # fmt: skip

    def broken(*_args, **_kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(over_training, "sparsing_law", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(args)
    assert (tmp_path / "tiny" / "report" / "index.html").is_file()
    assert "Sparsing Law measurement failed" in capsys.readouterr().err

    def refused(*_args, **_kwargs):
        raise UserError("too few tokens")

    monkeypatch.setattr(over_training, "sparsing_law", refused)
    assert main(args) == 0
    assert "Sparsing Law section skipped: too few tokens" in capsys.readouterr().err
    assert (tmp_path / "tiny-2" / "report" / "index.html").is_file()
