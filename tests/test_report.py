"""The report: tables against hand-computed fixture values, findings, files, and a real browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from reference import reference_stats
from report_fixtures import (
    HIDDEN,
    LayerSpec,
    activations,
    contrary,
    make_empty_run,
    make_run,
    paper_like,
)
from sparsetrace import paper as published
from sparsetrace.claims import FAILS, HOLDS, INCONCLUSIVE, NA, NO_DATA
from sparsetrace.errors import UserError
from sparsetrace.report import text_summary, write_report
from sparsetrace.report.findings import FINDINGS, evaluate, halfway_drop_steps
from sparsetrace.report.rundata import RunData, prepare
from sparsetrace.rundir import load_run

PAPER = published.LABEL


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    four = [paper_like()[i] for i in (0, 1, 4, 5)]
    return {
        "paper_like": make_run(root / "paper_like"),
        "contrary": make_run(root / "contrary", contrary(), warmup=200),
        "four": make_run(root / "four", four, upto=600, name="four-layer"),
        "empty": make_empty_run(root / "empty"),
    }


@pytest.fixture(scope="module")
def single(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_report([runs["paper_like"]], tmp_path_factory.mktemp("single") / "report")


@pytest.fixture(scope="module")
def multi(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    dirs = [runs["paper_like"], runs["four"], runs["empty"]]
    return write_report(dirs, tmp_path_factory.mktemp("multi") / "report")


def _prepared(path: Path) -> RunData:
    run = load_run(path)
    return prepare(run, run.name)


def _csv(index: Path, key: str) -> pd.DataFrame:
    return pd.read_csv(index.parent / "tables" / f"{key}.csv", index_col=0)


# --------------------------------------------------------------------------------------------------
# Tables against the fixture's construction


def test_table1_cells_equal_the_constructed_use(single: Path) -> None:
    table = _csv(single, "table1")
    for layer, spec in enumerate(paper_like()):
        k, s, b = spec.token[1], spec.sequence[1], spec.batch[1]
        row = table.loc[layer]
        assert row["paper_like: per-token (%)"] == pytest.approx(100 * k / HIDDEN)
        assert row["paper_like: per-sequence (%)"] == pytest.approx(100 * s / HIDDEN)
        assert row["paper_like: per-batch (%)"] == pytest.approx(100 * b / HIDDEN)
        assert row["paper_like: token/seq"] == pytest.approx(k / s)
        assert row["paper_like: seq/batch"] == pytest.approx(s / b)
    # Spot checks written out: layer 0 ends at 32 of 256 units per batch, layer 5 at 236.
    assert table.loc[0, "paper_like: per-batch (%)"] == pytest.approx(12.5)
    assert table.loc[5, "paper_like: per-batch (%)"] == pytest.approx(92.1875)
    # The paper's column, once: Table 1 as published.
    assert table.loc[0, f"{PAPER}: per-batch (%)"] == 13.3
    assert table.loc[5, f"{PAPER}: per-token (%)"] == 3.0
    assert sum(c.startswith(PAPER) for c in table.columns) == 5


def test_table2_cells_equal_the_constructed_lifecycle(single: Path) -> None:
    table = _csv(single, "table2")
    for layer, spec in enumerate(paper_like()):
        first = set(range(spec.offset[0], spec.offset[0] + spec.batch[0]))
        last = set(range(spec.offset[1], spec.offset[1] + spec.batch[1]))
        row = table.loc[layer]
        assert row["paper_like: on at batch 0 (%)"] == pytest.approx(100 * len(first) / HIDDEN)
        assert row["paper_like: turned on (%)"] == pytest.approx(100 * len(last - first) / HIDDEN)
        assert row["paper_like: turned off (%)"] == pytest.approx(100 * len(first - last) / HIDDEN)
        assert row["paper_like: final use (%)"] == pytest.approx(100 * len(last) / HIDDEN)
        # Never used: off at the first and at the last batch (Table 2's arithmetic).
        assert row["paper_like: never used (%)"] == pytest.approx(
            100 * (HIDDEN - len(first | last)) / HIDDEN
        )
    assert table.loc[0, "paper_like: turned off (%)"] == pytest.approx(100 * 864 / 1024)
    assert table.loc[0, f"{PAPER}: turned off (%)"] == 83.8
    # The paper's never-used column is its Table 2's arithmetic: 100 - 87.5 - 12.2 for layer 5.
    assert table.loc[5, f"{PAPER}: never used (%)"] == pytest.approx(0.3)


def test_table3_percentiles_equal_the_naive_a6_transcription(single: Path) -> None:
    """Each percentile cell equals tests/reference.py (A.6 taken literally, np.percentile) on the
    fixture's last-step activations; the fixture's units fire on two different shares of a
    sequence, so the four percentiles differ and a swapped column would show."""
    table = _csv(single, "table3")
    gen = torch.Generator().manual_seed(0)
    pcts = (50.0, 65.0, 75.0, 90.0)
    distinct = 0
    for layer, spec in enumerate(paper_like()):
        ref = reference_stats(activations(spec, 1.0, gen).numpy(), percentiles=pcts)
        values = [100 * float(ref["percentiles"][p]) for p in pcts]
        for p, expected in zip(pcts, values, strict=True):
            assert table.loc[layer, f"paper_like: p{p:g} (%)"] == pytest.approx(expected)
        distinct += len(set(np.round(values, 6))) > 1
    assert distinct >= 3  # half the layers have percentiles that differ from one another
    assert table.loc[0, f"{PAPER}: p65 (%)"] == 31.3


def test_correlation_is_numpys_corrcoef(runs: dict[str, Path], single: Path) -> None:
    specs = paper_like()
    expected = np.corrcoef([s.token[1] for s in specs], [s.batch[1] for s in specs])[0, 1]
    rd = _prepared(runs["paper_like"])
    verdict = evaluate(rd)["token_batch_anticorrelation"]
    assert verdict.evidence.startswith(f"r = {expected:+.2f}, 95% CI [")
    assert f"paper_like: r = {expected:+.2f}" in single.read_text()


def test_text_summary_is_aligned_tables_1_and_2(runs: dict[str, Path]) -> None:
    text = text_summary(runs["paper_like"])
    lines = text.splitlines()
    assert lines[0] == "paper_like: finished, step 1000 of 1000 (100 %)"
    layer0 = next(line for line in lines if line.startswith("0 "))
    assert layer0.split()[1:5] == ["run", "6.2", "12.5", "12.5"]
    rows = [line for line in lines if " run " in line or " paper " in line]
    assert len(rows) == 12 and len({len(r) for r in rows}) == 1  # one run, one paper row a layer
    assert "no sparsity measurements yet" in text_summary(runs["empty"])


# --------------------------------------------------------------------------------------------------
# Findings


def test_paper_like_run_shows_every_finding(runs: dict[str, Path]) -> None:
    verdicts = evaluate(_prepared(runs["paper_like"]))
    assert {k: v.outcome for k, v in verdicts.items()} == {f.key: HOLDS for f in FINDINGS}


def test_contrary_run_shows_no_finding(runs: dict[str, Path]) -> None:
    verdicts = evaluate(_prepared(runs["contrary"]))
    assert {k: v.outcome for k, v in verdicts.items()} == {f.key: FAILS for f in FINDINGS}


# What the paper's own tables say under the rules (hand-checked against Tables 1-3):
PAPER_OUTCOMES = {
    "first_fewest_batch": HOLDS,  # 13.3 % vs the next lowest 71.0 %
    "last_most_batch": HOLDS,  # 95.6 % vs 86.1 %
    "token_batch_anticorrelation": INCONCLUSIVE,  # r = -0.05 over 6 layers
    "first_batch_falls": HOLDS,  # 97.0 > 93.2 > 90.9 > 89.0 > 88.2 > 87.5
    "turned_on_rises": HOLDS,  # 0.05 < 1.7 < 2.6 < 4.3 < 8.5 < 12.2
    "first_turns_off_most": HOLDS,  # 83.8 % vs 22.5 %
    "per_token_drops_top_first": NO_DATA,
    "p50_drops_top_first": NO_DATA,
    "first_most_frequent": HOLDS,  # p65 31.3 % vs 3.2 %
    "deaths_after_high_lr": NO_DATA,
    "never_used": FAILS,  # layer 5: 100 - 87.5 - 12.2 = 0.3 %
}


def test_paper_column_applies_the_rules_to_the_published_tables() -> None:
    assert {f.key: f.paper.outcome for f in FINDINGS} == PAPER_OUTCOMES
    by_key = {f.key: f.paper.evidence for f in FINDINGS}
    assert "97.0 → 93.2 → 90.9 → 89.0 → 88.2 → 87.5" in by_key["first_batch_falls"]
    assert by_key["first_fewest_batch"].startswith("layer 0: 13.3 %")
    assert "the text states r = -0.15" in by_key["token_batch_anticorrelation"]


def test_paper_column_is_computed_not_asserted(monkeypatch) -> None:
    """Changing a published number changes the paper column: nothing there is hard-coded."""
    changed = dict(published.TABLE1)
    changed[3] = (6.4, 54.2, 12.0, 0.118, 0.742)  # layer 3 now uses fewer units than layer 0
    monkeypatch.setattr(published, "TABLE1", changed)
    by_key = {f.key: f.paper for f in FINDINGS}
    assert by_key["first_fewest_batch"].outcome == FAILS
    table2 = dict(published.TABLE2)
    table2[5] = (87.5, 7.5, 3.8, 95.6)  # never used 5.0 % in layer 5: the band holds
    monkeypatch.setattr(published, "TABLE2", table2)
    assert {f.key: f.paper for f in FINDINGS}["never_used"].outcome == HOLDS


def _with_layers(rd: RunData, **columns: list[float]) -> RunData:
    layers = pd.DataFrame(
        columns, index=pd.Index(range(len(next(iter(columns.values())))), name="layer")
    )
    return RunData(rd.run, rd.label, rd.series, rd.end_step, layers, rd.transitions)


def test_findings_decide_on_the_layer_table(runs: dict[str, Path]) -> None:
    """The lifecycle findings read the layer table with binomial errors (1024 units a layer)."""
    rd = _prepared(runs["paper_like"])
    check = {f.key: f.check for f in FINDINGS}
    falls = check["first_batch_falls"]
    assert falls(_with_layers(rd, on_first_batch=[97.0, 90.0, 83.0])).outcome == HOLDS
    assert falls(_with_layers(rd, on_first_batch=[90.0, 95.0, 97.0])).outcome == FAILS
    # Differences below ~1.6 pp are ties for 1024 units: one pair as claimed, two tied.
    assert falls(_with_layers(rd, on_first_batch=[97.0, 96.5, 95.0])).outcome == INCONCLUSIVE
    assert falls(_with_layers(rd, on_first_batch=[90.0, 95.0])).outcome == NA
    never = check["never_used"]
    assert never(_with_layers(rd, never_used=[5.0, 4.0, 6.0])).outcome == HOLDS
    assert never(_with_layers(rd, never_used=[5.0, 4.0, 0.0])).outcome == FAILS  # one layer
    assert never(_with_layers(rd, never_used=[5.0, 2.2, 6.0])).outcome == INCONCLUSIVE


def test_death_timing_needs_a_warmup(runs: dict[str, Path]) -> None:
    rd = _prepared(runs["paper_like"])
    for source in (rd.run.meta, rd.run.config):
        source["train"].pop("warmup_steps")
    verdict = evaluate(rd)["deaths_after_high_lr"]
    assert verdict.outcome == NA and "warm-up length unknown" in verdict.evidence


def test_flickering_units_are_not_deaths(tmp_path: Path) -> None:
    """Units that switch off and back on (a window that slides away and returns) are counted
    as flickers, not deaths."""
    there_and_back = [LayerSpec(token=(16, 16), sequence=(64, 64), batch=(512, 512),
                                offset=(0, 0), ramp=(0.2, 0.5))] * 3  # fmt: skip
    run = make_run(tmp_path / "flicker", there_and_back)
    lifecycle = json.loads((run / "lifecycle.json").read_text())
    # Force a flicker: unit 0 of layer 0 off at one measured step in the middle, then on again.
    layer = lifecycle["layers"]["0"]
    layer["transitions"][20][2] += 1
    layer["transitions"][21][3] += 1
    (run / "lifecycle.json").write_text(json.dumps(lifecycle))
    verdict = evaluate(_prepared(run))["deaths_after_high_lr"]
    assert verdict.outcome == FAILS and "no unit died permanently" in verdict.evidence
    assert "1 switch-offs undone later" in verdict.evidence


def test_halfway_drop_steps_by_hand() -> None:
    series = pd.DataFrame(
        {
            "step": [0, 10, 20, 30] * 2,
            "layer": [0] * 4 + [1] * 4,
            "m": [1.0, 0.9, 0.5, 0.2, 0.3, 0.4, 0.5, 0.6],  # layer 0 falls, layer 1 rises
        }
    )
    # Layer 0: halfway between 1.0 and 0.2 is 0.6, first reached at step 20.
    assert halfway_drop_steps(series, "m") == {0: 20, 1: None}


# --------------------------------------------------------------------------------------------------
# Files and robustness

EXPECTED_FIGURES = [
    "fig1_per_batch", "fig2a_per_token_early", "fig2b_p50_early", "units_switched_off",
    "training_curves", "a1_per_token_full", "a1_per_sequence_full", "a1_per_batch_early",
    "a2_p50_full", "a2_p65_early", "a2_p65_full", "a2_p75_early", "a2_p75_full",
    "a2_p90_early", "a2_p90_full",
]  # fmt: skip
EXPECTED_TABLES = ["runs", "findings", "table1", "table2", "table3", "roles"]


def _check_files(index: Path) -> str:
    out = index.parent
    assert index.name == "index.html"
    html = index.read_text()
    markdown = (out / "report.md").read_text()
    for key in EXPECTED_FIGURES:
        png = out / "figures" / f"{key}.png"
        with Image.open(png) as img:
            img.verify()
        with Image.open(png) as img:
            assert img.format == "PNG" and img.width > 500 and img.height > 300
        assert (out / "figures" / f"{key}.svg").read_text().lstrip().startswith("<?xml")
        assert f'src="figures/{key}.png"' in html
        assert f"(figures/{key}.png)" in markdown
    for key in EXPECTED_TABLES:
        assert not pd.read_csv(out / "tables" / f"{key}.csv").empty
        assert f'id="tbl-{key}"' in html
    # Every image the page references exists; the page needs no network and no JavaScript.
    for src in re.findall(r'<img src="([^"]+)"', html):
        assert (out / src).is_file(), src
    assert "<script" not in html.lower()
    assert not re.search(r'(src|href)="(https?:)?//', html)
    return html


def test_single_run_report_files(single: Path, runs: dict[str, Path]) -> None:
    html = _check_files(single)
    assert "paper_like" in html and "finished" in html
    # The findings say how many tokens the run saw, against the paper's scale.
    tokens = pd.read_csv(runs["paper_like"] / "sparsity.csv")["tokens"].max()
    assert 1e3 <= tokens < 1e6
    assert f"training tokens seen here: paper_like: {tokens / 1e3:.3g}k" in html
    overview = _csv(single, "runs")
    arithmetic = "portable (AVX2 kernels, MKL branch COMPATIBLE, 2 threads)"  # the fixture's meta
    assert overview.loc["CPU arithmetic"].tolist()[0] == arithmetic


def test_multi_run_report_with_other_depth_in_progress_and_empty(multi: Path) -> None:
    html = _check_files(multi)
    table = _csv(multi, "table1")
    groups = {c.rsplit(": ", 1)[0] for c in table.columns}
    assert groups == {"paper_like", "four-layer", PAPER}  # the empty run is left out
    assert list(table.index) == [0, 1, 2, 3, 4, 5]
    assert table.loc[[4, 5], "four-layer: per-batch (%)"].isna().all()
    assert table.loc[3, "four-layer: per-batch (%)"] == pytest.approx(100 * 236 / 256)
    roles = _csv(multi, "roles")
    assert roles.loc["last layer", "four-layer: layer"] == 3
    assert roles.loc["last layer", f"{PAPER}: layer"] == 5
    assert "four-layer has 4 layers" in html
    assert "four-layer is still training (step 600 of 1000 (60 %))" in html
    assert (
        "empty is still training (step 0 of 1000 (0 %)) and has no sparsity measurements yet"
        in html
    )


def test_run_without_metrics_reports_what_is_missing(runs: dict[str, Path], tmp_path: Path) -> None:
    index = write_report([runs["empty"]], tmp_path / "report")
    html = index.read_text()
    assert "has no sparsity measurements yet" in html
    assert "sparsity.csv, train.csv, eval.csv, lifecycle.json" in html
    assert "Figure 1: hidden units used per batch: no data yet." in html
    assert (tmp_path / "report" / "report.md").is_file()
    assert _csv(index, "table1").columns.str.startswith(PAPER).all()  # paper values still shown


def test_not_a_run_directory_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a sparsetrace run directory"):
        write_report([tmp_path], tmp_path / "out")
    with pytest.raises(UserError, match="no such run directory"):
        text_summary(tmp_path / "nowhere")
    with pytest.raises(UserError):
        write_report([], tmp_path / "out")


# --------------------------------------------------------------------------------------------------
# A real browser

CHECK_SCRIPT = """
<script>
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  const broken = imgs.filter((i) => !(i.complete && i.naturalWidth > 0)).map((i) => i.src);
  const out = document.createElement("pre");
  out.id = "img-check";
  out.textContent = JSON.stringify({total: imgs.length, broken: broken});
  document.body.appendChild(out);
});
</script>
"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("chromium not installed: no chromium/chrome binary on PATH")


def test_index_renders_in_headless_chromium(multi: Path) -> None:
    browser = _chromium()
    # The report itself has no JavaScript: the check runs in a copy beside it.
    probe = multi.parent / "_probe.html"
    probe.write_text(multi.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    result = subprocess.run(
        [browser, "--headless", "--disable-gpu", "--no-sandbox", "--allow-file-access-from-files",
         "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    probe.unlink()
    found = re.search(r'<pre id="img-check">(.*?)</pre>', result.stdout, re.S)
    assert found, f"no image check in the DOM; stderr: {result.stderr[-2000:]}"
    check = json.loads(found.group(1).replace("&quot;", '"'))
    assert check["broken"] == []
    assert check["total"] == len(EXPECTED_FIGURES)
    for key in EXPECTED_FIGURES:
        assert f'id="fig-{key}"' in result.stdout
    for key in EXPECTED_TABLES:
        assert f'id="tbl-{key}"' in result.stdout
