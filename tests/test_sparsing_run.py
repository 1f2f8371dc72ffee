"""Sparsing Law on a tiny trained ReLU model: PPL-p% search, p -> 0, baselines, over training and
the ``sparsing-law`` verb."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sparsetrace.checkpoint import load_trained_model
from sparsetrace.config import load_config
from sparsetrace.data import prepare_data
from sparsetrace.device import mkl_branch
from sparsetrace.errors import UserError
from sparsetrace.sites import MlpSites, mlp_sites
from sparsetrace.sparsing import verbs
from sparsetrace.sparsing.baselines import evaluate_baseline, match_ppl
from sparsetrace.sparsing.cett import cett
from sparsetrace.sparsing.figures import plot_activation_ratio
from sparsetrace.sparsing.laws import fit_law
from sparsetrace.sparsing.over_training import COLUMNS, sparsing_law
from sparsetrace.sparsing.search import (
    PPL_TOL,
    REFINE_QUANTILES,
    Subject,
    find_cett,
    ppl_sparsity,
    search_uncertainty,
)
from sparsetrace.sparsing.source import validation_batches

TOKENS = 4096  # evaluation tokens: 128 windows of the tiny preset's 32


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_run: Callable) -> Iterator[Path]:
    """The tiny preset, 20 steps, checkpoints every 5 (steps 5, 10, 15, 20); the token cache is
    set for the module's tests."""
    with tiny_run(tmp_path_factory.mktemp("sparsing"), "--checkpoint.every", "5") as run:
        yield run


@pytest.fixture(scope="module")
def subject(run_dir: Path) -> Subject:
    model, cfg = load_trained_model(run_dir)
    batches = validation_batches(prepare_data(cfg.data).val, cfg.data.seq_len, TOKENS)
    plain = mlp_sites(model)  # decisions on the hidden activation (the model is plain anyway)
    return Subject(model, batches, MlpSites(plain.architecture, plain.down, {}))


@pytest.fixture(scope="module")
def dense_hidden(subject: Subject) -> dict[str, torch.Tensor]:
    """Each layer's hidden activation on the evaluation set, captured with plain hooks."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in subject.down}
    handles = [
        m.register_forward_pre_hook(lambda _m, args, name=name: seen[name].append(args[0]))
        for name, m in subject.down.items()
    ]
    with torch.no_grad():
        for batch in subject.batches:
            subject.model(batch.inputs)
    for h in handles:
        h.remove()
    return {name: torch.cat(chunks) for name, chunks in seen.items()}


def test_ppl_search_lands_on_target(subject: Subject, dense_hidden: dict) -> None:
    result = ppl_sparsity(subject, p=1.0, search_se=True)
    m = result.measurement
    assert abs(m.ppl_ratio - 1.01) <= PPL_TOL * 0.01
    assert result.uncertainty is not None and result.uncertainty.se > m.activation_ratio_se > 0
    assert m.ppl_ratio == result.search.value and m.cett == result.search.x
    # the outer loop runs the model once per distinct candidate c, plus the 2 dense passes and
    # the uncertainty's refinement
    refine = len(REFINE_QUANTILES)
    assert result.passes <= 2 + len(result.search.points) + refine <= 2 + 20 + refine
    dense = subject.reference.dense.mean_activation_ratio
    assert 0 < m.activation_ratio < dense
    for name, layer in m.layers.items():
        # each layer's CETT at its threshold, by the direct definition on the dense activations
        direct = float(cett(dense_hidden[name], subject.down[name].weight.detach(), layer.tau))
        assert layer.cett == pytest.approx(direct, abs=1e-5)
        assert layer.cett <= m.cett
        assert 0 <= layer.ratio_gap < 1e-3


def test_search_uncertainty_refines_around_the_resampled_c(subject: Subject) -> None:
    search = find_cett([subject], p=1.0)
    before = set(subject.probed)
    (boot,) = search_uncertainty([subject], p=1.0)
    added = set(subject.probed) - before
    assert 1 <= len(added) <= len(REFINE_QUANTILES)
    lo, hi = boot.c_interval()
    assert lo <= search.x <= hi and boot.clipped < 0.05
    fixed = subject.measure(search.x).activation_ratio_se
    assert math.isfinite(boot.se) and boot.se > fixed > 0  # the search adds to the spread


def test_relu_activation_ratio_tends_to_the_nonzero_fraction(
    subject: Subject, dense_hidden: dict
) -> None:
    nonzero = {name: float((a != 0).double().mean()) for name, a in dense_hidden.items()}
    # c = 0: each layer's threshold is its smallest positive norm; only zeros go, the model is
    # the dense one and the activation ratio is exactly the nonzero fraction
    at_zero = subject.measure(0.0)
    assert at_zero.ppl_ratio == 1.0
    for name, layer in at_zero.layers.items():
        assert layer.activation_ratio == pytest.approx(nonzero[name], rel=1e-12)
    mean_nonzero = sum(nonzero.values()) / len(nonzero)
    by_c = [subject.measure(c).activation_ratio for c in (1e-1, 1e-2, 1e-3, 1e-4)]
    assert by_c == sorted(by_c) and by_c[-1] == pytest.approx(mean_nonzero, abs=5e-3)
    # the PPL-p% search: a smaller p keeps more units, up to the nonzero fraction
    by_p = [ppl_sparsity(subject, p).measurement.activation_ratio for p in (1.0, 1e-2)]
    assert by_p[0] < by_p[1] < mean_nonzero


def test_baselines_match_the_same_ppl(subject: Subject) -> None:
    d_ff = next(iter(subject.down.values())).in_features
    for baseline in ("topk", "fat"):
        point = match_ppl(subject, baseline, p=1.0)
        # Top-k moves in steps of one unit: its ratio lands near, not within 1e-4 of, the target
        assert point.ppl_ratio == pytest.approx(1.01, abs=2e-3)
        assert 0 < point.activation_ratio < subject.reference.dense.mean_activation_ratio
    # nothing dropped: every unit kept (Top-k with k = d_ff) or eps 0 -> the dense model
    for baseline, param in (("topk", 1.0), ("fat", 0.0)):
        point = evaluate_baseline(subject, baseline, param)
        assert point.ppl_ratio == 1.0
        assert point.layers == subject.reference.dense.activation_ratio
    assert evaluate_baseline(subject, "topk", 5 / d_ff).activation_ratio <= 5 / d_ff


def test_baseline_match_with_its_search_redone_on_resamples(subject: Subject) -> None:
    """match_ppl(search_se=True): each resample finds its own parameter on its own losses, so
    the SE exceeds the one at the matched parameter; the resamples' strengths straddle it."""
    from sparsetrace.sparsing.baselines import strength

    for baseline in ("topk", "fat"):
        point = match_ppl(subject, baseline, p=1.0, search_se=True)
        assert match_ppl(subject, baseline, p=1.0).uncertainty is None  # only when asked
        boot = point.uncertainty
        assert boot is not None and boot.se > point.activation_ratio_se > 0
        lo, hi = boot.c_interval()
        assert lo <= strength(baseline, point.param) <= hi and boot.clipped < 0.05


def test_a_one_sided_baseline_match_is_probed_beyond_until_no_resample_is_clipped(
    subject: Subject, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a loose tolerance the bisection stops at its first probe, below the target: every
    resample would be clipped there (an SE of ~0). Probing beyond it brackets them all."""
    from sparsetrace.sparsing import baselines

    monkeypatch.setattr(baselines, "PPL_TOL", 2.0)  # |ratio - 1.01| <= 0.02: the first probe
    point = match_ppl(subject, "topk", p=1.0, search_se=True)
    assert point.param == 0.5 and point.ppl_ratio < 1.01  # one probe, below the target
    assert point.uncertainty.clipped == 0
    assert point.uncertainty.c.min() > 0.5  # the resamples' strengths lie beyond the probe


@pytest.mark.slow
def test_sparsing_baselines_compares_three_methods_at_one_ppl(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from sparsetrace.cli import main
    from sparsetrace.sparsing.comparison import JSON_NAME

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    verbs.sparsing_baselines(run, tokens=TOKENS, definition="both")
    out = capsys.readouterr().out
    summary = json.loads((run / JSON_NAME).read_text())
    assert [(m["method"], m["definition"]) for m in summary["methods"]] == [
        ("cett", ""), ("topk", "reference"), ("fat", "reference"), ("topk", "ours"),
        ("fat", "ours"),
    ]  # fmt: skip
    # independently: a fresh subject on the same tokens gives the same c, and each baseline's
    # recorded parameter gives its recorded ratio
    model, cfg = load_trained_model(run)
    batches = validation_batches(prepare_data(cfg.data).val, cfg.data.seq_len, TOKENS)
    fresh = Subject(model, batches)
    cett_row, *rows = summary["methods"]
    assert cett_row["value"] == ppl_sparsity(fresh, 1.0).search.x
    for row in rows:
        again = evaluate_baseline(fresh, row["method"], row["value"], row["definition"])
        assert again.activation_ratio == pytest.approx(row["activation_ratio"], rel=1e-12)
        assert row["ppl_ratio"] == pytest.approx(1.01, abs=2e-3)  # Top-k: one-unit steps
        assert row["se_search"] > row["se_fixed"] >= 0
    topk_ours = rows[2]  # exactly round(k * d_ff) units of every token: the ratio is k, SE 0
    d_ff = cfg.model.d_ff
    assert topk_ours["activation_ratio"] == round(topk_ours["value"] * d_ff) / d_ff
    assert topk_ours["se_fixed"] == 0
    cett_boot = ppl_sparsity(fresh, 1.0, search_se=True).uncertainty.ratio
    for d, row in zip(summary["differences"], rows, strict=True):
        assert d["minus_cett"] == pytest.approx(row["activation_ratio"] -
                                                cett_row["activation_ratio"])  # fmt: skip
        # paired: the same resamples row by row (unpaired, the SE would be ~sqrt(2)x larger)
        boot = match_ppl(fresh, d["method"], 1.0, d["definition"], search_se=True).uncertainty
        assert d["se"] == pytest.approx(np.std(boot.ratio - cett_boot, ddof=1), rel=1e-9)
        unpaired = np.std(boot.ratio - np.roll(cett_boot, 1), ddof=1)
        assert d["se"] < 0.9 * unpaired
        assert (
            row["clipped"] == 0 and row["interval_95"][0] <= row["value"] <= row["interval_95"][1]
        )
    assert "activation ratio of Top-k (reference) minus PPL-1%'s" in out
    assert f"wrote {run / JSON_NAME}" in out
    # the run report shows the comparison (a run measured by this verb alone)
    from sparsetrace.report import write_report

    md = write_report([run], tmp_path / "report").with_name("report.md").read_text()
    assert "PPL-1% sparsity and its baselines" in md
    (table,) = (tmp_path / "report" / "tables").glob("sparsing_baselines_*.csv")
    frame = pd.read_csv(table, index_col=0)
    assert frame.loc["FAT-ε reference", "minus PPL-1% (points)"] == pytest.approx(
        100 * summary["differences"][1]["minus_cett"]
    )
    # bad input: one line, exit 2, the file already there untouched
    before = (run / JSON_NAME).read_text()
    assert main(["sparsing-baselines", str(run), "--definition", "mine"]) == 2
    assert main(["sparsing-baselines", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "--definition must be reference, ours or both; got 'mine'" in err
    assert "Traceback" not in err
    assert (run / JSON_NAME).read_text() == before


def test_sparsing_law_over_training(run_dir: Path) -> None:
    csv = sparsing_law(run_dir, p=1.0, tokens=2048, last=2)
    assert csv == run_dir / "sparsing_law.csv"
    frame = pd.read_csv(csv, dtype={"layer": str})
    assert list(frame.columns) == COLUMNS
    assert sorted(frame.step.unique()) == [5, 10, 15, 20]
    per_step = json.loads((run_dir / "meta.json").read_text())["train"]["tokens_per_step"]
    assert (frame.tokens == frame.step * per_step).all()
    assert sorted(frame.layer.unique()) == ["0", "1", "all"]
    summary = json.loads((run_dir / "sparsing_law.json").read_text())
    assert summary["search"]["checkpoints"] == [15, 20]
    assert abs(summary["search"]["mean_ppl_ratio"] - 1.01) <= PPL_TOL * 0.01
    # one c for every checkpoint: each layer's CETT stays at or below it
    assert (frame[frame.layer != "all"].cett <= summary["cett"]).all()
    final_two = frame[(frame.layer == "all") & frame.step.isin([15, 20])].ppl_ratio
    assert final_two.mean() == pytest.approx(summary["search"]["mean_ppl_ratio"])
    # the SE with the search: for the two checkpoints searched on, null (not NaN) for the others
    se_search = {c["step"]: c["activation_ratio_se_search"] for c in summary["checkpoints"]}
    assert se_search[5] is None and se_search[10] is None
    assert se_search[15] > 0 and se_search[20] > 0
    lo, hi = summary["search"]["c_interval_95"]
    assert lo <= summary["cett"] <= hi
    assert "NaN" not in (run_dir / "sparsing_law.json").read_text()  # valid JSON for jq & co.
    # How the measuring process rounded on the CPU, as torch reports it to this (same) process.
    assert summary["cpu_arithmetic"] == {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                         "mkl_cbwr": mkl_branch(),
                                         "threads": torch.get_num_threads()}  # fmt: skip
    assert summary["windows"] == "random, seed 0" and summary["tokens_requested"] == 2048
    png = plot_activation_ratio(csv, run_dir / "ratio.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_sparsing_law_verb(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    verbs.sparsing_law(run_dir, p=2.0, tokens=1024)
    text = capsys.readouterr().out
    assert "PPL-2% sparsity" in text and "CETT c =" in text
    assert len([line for line in text.splitlines() if line.split()[:1] == ["20"]]) == 1
    assert (run_dir / "sparsing_law.png").read_bytes()[:4] == b"\x89PNG"
    verbs.sparsing_law(run_dir, p=2.0, tokens=1024, json=True)
    summary = json.loads(capsys.readouterr().out)
    assert summary["p"] == 2.0 and summary["tokens_evaluated"] == 1024
    assert [c["step"] for c in summary["checkpoints"]] == [5, 10, 15, 20]


@pytest.mark.slow
def test_replicates_repeat_the_whole_measurement_on_disjoint_token_sets(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from sparsetrace.report import write_report

    cfg = load_config("tiny")
    val, seq = prepare_data(cfg.data).val, cfg.data.seq_len
    sets = [validation_batches(val, seq, 512, token_set=k) for k in range(3)]
    available = (len(val) - 1) // seq
    order = np.random.default_rng(0).permutation(available)  # WINDOW_SEED, by hand
    seen: set[int] = set()
    for k, batches in enumerate(sets):  # the k-th 16 windows of the permutation, in order
        rows = torch.cat([b.inputs for b in batches])
        assert rows.shape == (16, seq)
        windows = sorted(order[16 * k : 16 * (k + 1)])
        for i in (0, 1, 15):
            start = windows[i] * seq
            assert rows[i].tolist() == val[start : start + seq].tolist()
        assert seen.isdisjoint(windows)
        seen.update(windows)
    last = available // 16 - 1  # the last whole set fits, the next does not
    assert len(validation_batches(val, seq, 512, token_set=last)) == len(sets[0])
    with pytest.raises(UserError, match="disjoint sets"):
        validation_batches(val, seq, 512, token_set=last + 1)
    rep_dir = tmp_path / "rep"
    shutil.copytree(run_dir, rep_dir, ignore=shutil.ignore_patterns("sparsing_law.*"))
    verbs.sparsing_law(rep_dir, tokens=512, final_only=True, replicates=2)
    assert "Replicates: the whole measurement of step 20" in capsys.readouterr().out
    summary = json.loads((rep_dir / "sparsing_law.json").read_text())
    rep = summary["replicates"]
    ratios = [r["activation_ratio"] for r in rep["sets"]]
    assert [r["token_set"] for r in rep["sets"]] == [1, 2] and rep["tokens_per_set"] == 512
    assert rep["sd"] == pytest.approx(float(np.std(ratios, ddof=1)))
    model, _ = load_trained_model(rep_dir, rep_dir / "checkpoints" / "step_0000020")
    direct = Subject(model, sets[2])
    c = find_cett([direct], 1.0).x  # set 2, searched on its own
    assert rep["sets"][1]["cett"] == c
    assert rep["sets"][1]["activation_ratio"] == direct.measure(c).activation_ratio
    md = write_report([rep_dir], tmp_path / "r").with_name("report.md").read_text()
    assert "Replicates: the whole measurement of step 20" in md
    final = summary["checkpoints"][-1]
    assert final["activation_ratio_se_search"] > 0 and "With the search for c redone" in md
    assert f"± {100 * final['activation_ratio_se_search']:.2f} (" in md
    assert "the one with the search" in md  # the replicates' SD against both SEs
    files = [rep_dir / "sparsing_law.json", rep_dir / "sparsing_law.csv"]
    before = [(f.read_bytes(), f.stat().st_mtime_ns) for f in files]
    with pytest.raises(UserError, match="replicates 0 or >= 2"):
        verbs.sparsing_law(rep_dir, replicates=1)
    with pytest.raises(UserError, match="does not fit"):  # refused before measuring or writing
        verbs.sparsing_law(rep_dir, tokens=512, final_only=True, replicates=10**6)
    assert [(f.read_bytes(), f.stat().st_mtime_ns) for f in files] == before


def test_sparsing_law_verb_errors(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="p must be > 0"):
        verbs.sparsing_law(run_dir, p=0.0)
    with pytest.raises(UserError, match="tokens"):
        verbs.sparsing_law(run_dir, tokens=0)
    with pytest.raises(UserError, match="neither a model directory"):
        verbs.sparsing_law(tmp_path)
    (tmp_path / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(UserError, match="no checkpoint"):
        verbs.sparsing_law(tmp_path)


@pytest.mark.slow
def test_final_only_and_the_run_reports_sparsing_law_section(run_dir: Path, tmp_path: Path) -> None:
    import shutil

    from sparsetrace.report import write_report

    one = tmp_path / "one"
    shutil.copytree(run_dir, one)
    sparsing_law(one, p=1.0, tokens=1024, final_only=True)
    summary = json.loads((one / "sparsing_law.json").read_text())
    assert [c["step"] for c in summary["checkpoints"]] == [20]
    assert summary["search"]["checkpoints"] == [20]
    final = summary["checkpoints"][0]
    md = write_report([one], tmp_path / "r1").with_name("report.md").read_text()
    section = md[md.index("## Sparsing Law: PPL-1% sparsity") :]
    assert f"Activation ratio at PPL-1%: {100 * final['activation_ratio']:.2f} %" in section
    hidden = load_config("tiny").model.d_ff
    (csv,) = (tmp_path / "r1" / "tables").glob("sparsing_law_*.csv")  # one run, no curve
    table = pd.read_csv(csv, index_col=0)
    for layer, v in final["layers"].items():  # dead units as % of the layer, per layer
        assert table.loc[f"layer {layer}", "dead units %"] == pytest.approx(
            100 * v["dead_units"] / hidden
        )
        assert table.loc[f"layer {layer}", "CETT threshold τ"] == pytest.approx(v["tau"])
    assert "one checkpoint measured" in section
    # every checkpoint: the over-training table, and a note that 4 points cannot be fitted
    sparsing_law(one, p=1.0, tokens=1024)
    md = write_report([one], tmp_path / "r2").with_name("report.md").read_text()
    section = md[md.index("## Sparsing Law: PPL-1% sparsity") :]
    assert "Activation ratio over training" in section
    assert "4 checkpoints, 1 of them during warm-up: fitting needs at least 5 after it" in section
    # the curve drawn (points only: no fit), beside the table; none for one checkpoint
    assert (tmp_path / "r2" / "figures" / "sparsing_law_over_training.png").read_bytes()[:4] == (
        b"\x89PNG"
    )
    assert "sparsing_law_over_training.png" in section
    assert not (tmp_path / "r1" / "figures" / "sparsing_law_over_training.png").exists()
    (curve_csv,) = (tmp_path / "r2" / "tables").glob("sparsing_law_curve_*.csv")
    curve = pd.read_csv(curve_csv, index_col=0)
    searched = set(json.loads((one / "sparsing_law.json").read_text())["search"]["checkpoints"])
    assert {s for s in curve.index if curve.loc[s, "± SE with search"] > 0} == searched
    mean = table.loc["mean of layers", "dead units %"]  # all layers' units together
    dead = sum(v["dead_units"] for v in final["layers"].values())
    assert mean == pytest.approx(100 * dead / (hidden * len(final["layers"])))
    # enough checkpoints: the law is fitted without the warm-up one (step 5 <= warm-up 5)
    fitted = _with_curve(one, steps=range(5, 50, 5))
    md = write_report([fitted], tmp_path / "r4").with_name("report.md").read_text()
    section = md[md.index("## Sparsing Law: PPL-1% sparsity") :]
    points = json.loads((fitted / "sparsing_law.json").read_text())["checkpoints"]
    expected = fit_law([c["tokens"] for c in points], [c["activation_ratio"] for c in points],
                       "relu", skip_first=1)  # fmt: skip
    assert expected.limit == pytest.approx(0.05, abs=2e-3)
    assert (f"relu law fitted to 8 checkpoints (the 1 taken during warm-up left out): limit "
            f"A0 = {100 * expected.limit:.2f} %") in section  # fmt: skip
    flat = _with_curve(one, steps=range(5, 50, 5), name="flat", ratio=lambda _step: 0.2)
    md = write_report([flat], tmp_path / "r5").with_name("report.md").read_text()
    assert "no law fitted: the activation ratio is 0.2 at every point" in md  # a note, no crash
    # no measurement: no section
    plain = tmp_path / "plain"
    shutil.copytree(run_dir, plain, ignore=shutil.ignore_patterns("sparsing_law.*"))
    md = write_report([plain], tmp_path / "r3").with_name("report.md").read_text()
    assert "Sparsing Law: PPL" not in md


def _with_curve(run: Path, steps: range, name: str = "curve", ratio=None) -> Path:
    """A copy of ``run`` whose ``sparsing_law.json`` holds one checkpoint per step, the ratio
    ``ratio(step)`` or by default following the ReLU law towards A0 = 0.05 (the first point, a
    warm-up transient, off it)."""
    import shutil

    from sparsetrace.sparsing.laws import relu_law

    out = run.parent / f"{run.name}-{name}"
    shutil.copytree(run, out)
    summary = json.loads((run / "sparsing_law.json").read_text())
    last = summary["checkpoints"][-1]
    per_step = 1e8  # tokens: 0.5B ... 4.5B, where the law has converged
    points = []
    for i, step in enumerate(steps):
        value = 0.9 if i == 0 else float(relu_law(step * per_step / 1e9, 1.0, -1.0, 1.0, 0.05))
        points.append({**last, "step": step, "tokens": int(step * per_step),
                       "activation_ratio": ratio(step) if ratio else value})  # fmt: skip
    summary["checkpoints"] = points
    (out / "sparsing_law.json").write_text(json.dumps(summary))
    return out
