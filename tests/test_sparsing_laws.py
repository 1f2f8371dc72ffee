"""Sparsing Law fits: parameters and curves recovered from noisy synthetic data (deterministic),
and the ``fit-law`` verb's inputs, outputs and errors; the training-loss law (limit loss) and
the width-depth bottleneck (two-segment line across arms) on synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import curve_fit

from sparsetrace.errors import UserError
from sparsetrace.sparsing import verbs
from sparsetrace.sparsing.laws import (
    fit_bottleneck,
    fit_law,
    fit_loss_law,
    loss_law,
    read_law_data,
    relu_law,
    silu_law,
    two_segment,
)

D = np.linspace(0.8, 400.0, 40)  # billions of tokens, like the paper's runs
NOISE = 1e-4


def noisy(values: np.ndarray, seed: int) -> np.ndarray:
    return values + np.random.default_rng(seed).normal(0.0, NOISE, values.shape)


# (alpha, b, c, A0): well-determined over D's range (the decay spans it)
RELU_SETS = [(0.449, -3.05, 0.286, 0.067), (0.683, -3.46, 0.079, 0.069), (1.33, -3.89, 9e-4, 0.078)]
# (alpha, c, A0)
SILU_SETS = [(0.479, 0.102, 0.409), (0.844, 0.208, 0.39), (0.3, 0.05, 0.5)]


@pytest.mark.parametrize("params", RELU_SETS)
def test_relu_law_recovered(params: tuple[float, ...]) -> None:
    alpha, b, c, a0 = params
    truth = relu_law(D, *params)
    fit = fit_law(D * 1e9, noisy(truth, 0), "relu")
    assert np.abs(fit.curve(D) - truth).max() < 5 * NOISE
    assert fit.mse < 2 * NOISE**2
    p = fit.params
    assert p["alpha"] == pytest.approx(alpha, rel=0.05)
    assert p["c"] == pytest.approx(c, rel=0.25)  # c and alpha trade off: c**(1/alpha) is sharp
    assert p["b"] == pytest.approx(b, abs=0.05)
    assert p["A0"] == pytest.approx(a0, abs=5 * NOISE)
    assert fit.baseline is not None and fit.baseline.mse > fit.mse


def test_relu_law_ill_determined_curve_still_recovered() -> None:
    # alpha 0.1: the decay has mostly happened before the first point; parameters trade off,
    # the curve does not
    truth = relu_law(D, 0.101, -0.0151, 3.2, 0.0614)
    fit = fit_law(D * 1e9, noisy(truth, 1), "relu")
    assert np.abs(fit.curve(D) - truth).max() < 5 * NOISE


@pytest.mark.parametrize("params", SILU_SETS)
def test_silu_law_recovered(params: tuple[float, ...]) -> None:
    alpha, c, a0 = params
    truth = silu_law(D, *params)
    fit = fit_law(D * 1e9, noisy(truth, 2), "silu")
    assert np.abs(fit.curve(D) - truth).max() < 5 * NOISE
    assert fit.params["b"] is None
    assert fit.params["alpha"] == pytest.approx(alpha, rel=0.03)
    assert fit.params["c"] == pytest.approx(c, rel=0.03)
    assert fit.params["A0"] == pytest.approx(a0, abs=5 * NOISE)
    assert fit.baseline is not None and fit.baseline.mse > fit.mse


def test_log_baseline_recovered_and_fits_deterministic() -> None:
    # A0 + c*log(a*D + b) with a = 2, b = 1 is A0 + c*log(2) + c*log(D + 0.5) in our a = 1 form
    truth = 0.3 - 0.02 * np.log(2.0 * D + 1.0)
    first = fit_law(D * 1e9, noisy(truth, 3), "silu")
    base = first.baseline
    assert base is not None and base.params["a"] == 1.0
    assert base.params["b"] == pytest.approx(0.5, rel=0.1)
    assert base.params["c"] == pytest.approx(-0.02, rel=0.02)
    assert np.abs(base.curve(D) - truth).max() < 5 * NOISE
    assert fit_law(D * 1e9, noisy(truth, 3), "silu") == first


def _write_csv(path: Path, n: int = 20) -> Path:
    d = np.linspace(1.0, 100.0, n)
    pd.DataFrame({"tokens": d * 1e9, "activation_ratio": silu_law(d, 0.5, 0.1, 0.4)}).to_csv(
        path, index=False
    )
    return path


def test_fit_law_verb_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    verbs.fit_law(_write_csv(tmp_path / "a.csv"), form="silu", json=True)
    out = json.loads(capsys.readouterr().out)  # exactly one JSON object
    assert set(out) == {"form", "params", "mae", "mse", "skip_first", "mse_all_points", "se",
                        "A0_interval", "A0_on_bound", "A0_flat", "A0_undetermined",
                        "baselines"}  # fmt: skip
    assert out["form"] == "silu" and out["params"]["b"] is None
    assert set(out["params"]) == {"alpha", "b", "c", "A0"}
    assert out["params"]["alpha"] == pytest.approx(0.5, rel=1e-3)
    lo, hi = out["A0_interval"]
    assert lo <= out["params"]["A0"] <= hi and set(out["se"]) == {"alpha", "c", "A0"}
    assert set(out["baselines"]) == {"log", "sigmoid"}
    assert set(out["baselines"]["log"]["params"]) == {"a", "b", "c", "A0"}
    assert set(out["baselines"]["sigmoid"]["params"]) == {"a", "b", "c", "d"}
    assert not list(tmp_path.glob("*.png"))  # --json: no plot


def test_fit_law_verb_text_and_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    verbs.fit_law(_write_csv(tmp_path / "a.csv"), form="silu")
    text = capsys.readouterr().out
    assert "silu: alpha = 0.5" in text and "log:" in text and "sigmoid:" in text
    assert "limit activation ratio A0 = 0.4" in text
    assert (tmp_path / "a_fit_silu.png").read_bytes()[:4] == b"\x89PNG"
    assert f"plot: {tmp_path / 'a_fit_silu.png'}" in text
    # a run directory: its sparsing_law.csv, overall rows only
    run = tmp_path / "run"
    run.mkdir()
    d = np.linspace(1.0, 50.0, 6)
    ratio = relu_law(d, 0.5, -1.0, 1.0, 0.1)
    rows = [
        {"step": i, "tokens": d[i] * 1e9, "layer": layer, "activation_ratio": ratio[i], "cett": 0.2,
         "ppl_ratio": 1.01}
        for i in range(len(d)) for layer in ("all", "0")
    ]  # fmt: skip
    pd.DataFrame(rows).to_csv(run / "sparsing_law.csv", index=False)
    verbs.fit_law(run)
    captured = capsys.readouterr()
    assert captured.out.startswith("6 points") and "relu:" in captured.out
    assert "activation unknown (config.yaml missing" in captured.err  # no config: relu, said
    assert (run / "sparsing_law_fit_relu.png").exists()
    # the authors' JSON (in a .txt file): token counts and ratios
    authors = tmp_path / "0.1b_relu.txt"
    authors.write_text(json.dumps({"token_passed": list(d * 1e9), "activation_ratio": list(ratio)}))
    verbs.fit_law(authors, json=True)
    assert json.loads(capsys.readouterr().out)["params"]["alpha"] == pytest.approx(0.5, rel=1e-3)


def test_fit_law_verb_fits_a_run_with_its_activations_form(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run directory is fitted with the law of its activation (config.yaml) unless --form says
    otherwise: a gated-SiLU run's rising curve gets the SiLU law, whose A0 lies above the points."""
    d = np.linspace(1.0, 50.0, 8)
    ratio = silu_law(d, 0.5, 0.1, 0.4)
    rows = [{"step": 100 * (i + 1), "tokens": d[i] * 1e9, "layer": "all",
             "activation_ratio": ratio[i], "cett": 0.2, "ppl_ratio": 1.01}
            for i in range(len(d))]  # fmt: skip
    pd.DataFrame(rows).to_csv(tmp_path / "sparsing_law.csv", index=False)
    (tmp_path / "config.yaml").write_text(
        "model:\n  activation: swiglu\ntrain:\n  warmup_steps: 0\n"
    )
    verbs.fit_law(tmp_path, json=True)
    out = json.loads(capsys.readouterr().out)
    assert out["form"] == "silu" and out["params"]["A0"] == pytest.approx(0.4, rel=1e-3)
    verbs.fit_law(tmp_path, form="relu", json=True)  # the flag wins
    assert json.loads(capsys.readouterr().out)["form"] == "relu"
    (tmp_path / "config.yaml").write_text("model:\n  activation: tanh\n")
    with pytest.raises(UserError, match="no Sparsing Law form for activation 'tanh'"):
        verbs.fit_law(tmp_path)


def test_fit_law_verb_errors(tmp_path: Path) -> None:
    good = _write_csv(tmp_path / "a.csv")
    with pytest.raises(UserError, match="--form"):
        verbs.fit_law(good, form="gelu")
    with pytest.raises(UserError, match="no such file"):
        verbs.fit_law(tmp_path / "missing.csv")
    with pytest.raises(UserError, match=r"no sparsing_law\.csv"):
        verbs.fit_law(tmp_path)
    pd.DataFrame({"tokens": [1, 2, 3, 4, 5], "ratio": [0.1] * 5}).to_csv(tmp_path / "b.csv")
    with pytest.raises(UserError, match=r"missing column.*activation_ratio"):
        verbs.fit_law(tmp_path / "b.csv")
    with pytest.raises(UserError, match="at least 5"):
        verbs.fit_law(_write_csv(tmp_path / "c.csv", n=4))
    zero = pd.DataFrame({"tokens": [0, 1, 2, 3, 4], "activation_ratio": [0.1] * 5})
    zero.to_csv(tmp_path / "d.csv")
    with pytest.raises(UserError, match="positive"):
        verbs.fit_law(tmp_path / "d.csv")
    (tmp_path / "e.json").write_text('{"token_passed": [1, 2]}')
    with pytest.raises(UserError, match="expected"):
        verbs.fit_law(tmp_path / "e.json")
    back = pd.DataFrame({"tokens": [1, 2, 3, 3, 5], "activation_ratio": [0.1] * 5})
    back.to_csv(tmp_path / "f.csv")
    with pytest.raises(UserError, match="increase"):
        verbs.fit_law(tmp_path / "f.csv")
    over = pd.DataFrame({"tokens": [1, 2, 3, 4, 5], "activation_ratio": [0.1, 0.2, 1.2, 0.3, 0.4]})
    over.to_csv(tmp_path / "g.csv")
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        verbs.fit_law(tmp_path / "g.csv")
    with pytest.raises(UserError, match="skip-first"):
        verbs.fit_law(good, skip_first=17)  # 20 points: 3 left
    flat = pd.DataFrame({"tokens": [1, 2, 3, 4, 5], "activation_ratio": [0.0] * 5})
    flat.to_csv(tmp_path / "h.csv")
    with pytest.raises(UserError, match="constant curve"):  # no law: every limit fits as well
        verbs.fit_law(tmp_path / "h.csv")
    tail = pd.DataFrame({"tokens": range(1, 8), "activation_ratio": [0.3, 0.2] + [0.1] * 5})
    tail.to_csv(tmp_path / "i.csv")
    with pytest.raises(UserError, match="constant curve"):  # constant once the first 2 are gone
        verbs.fit_law(tmp_path / "i.csv", skip_first=2)


def test_fit_law_cli_bad_input_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    from sparsetrace.cli import main

    pd.DataFrame({"tokens": [1, 2, 3, 4, 5], "activation_ratio": [0.2] * 5}).to_csv(
        tmp_path / "flat.csv", index=False
    )
    assert main(["fit-law", str(tmp_path / "flat.csv")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "constant curve" in err


def test_relu_curve_that_reaches_zero_pins_its_limit_at_zero() -> None:
    """A ReLU curve whose last point is 0 bounds A0 to [0, 0]: the fit must still follow the
    points (no log(0) in its starts) and report A0 = 0 with the degenerate interval."""
    import warnings

    truth = relu_law(D, 1.0, -2.0, 0.05, 0.0)
    ratio = truth.copy()
    ratio[-1] = 0.0  # the last point rounds to 0 (no unit left on at PPL-p%)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a log(0) or 0/0 in the fit would raise here
        fit = fit_law(D * 1e9, ratio, "relu")
    assert fit.limit == 0.0 and fit.a0_interval == (0.0, 0.0) and fit.limit_on_bound
    assert np.abs(fit.curve(D) - truth).max() < 1e-3


def test_bootstrap_interval_tracks_the_noise_and_covers_the_limit() -> None:
    """A residual bootstrap: deterministic, another interval than the covariance's, covering the
    true A0, and about 4x wider when the noise is 4x larger."""
    truth = silu_law(D, 0.5, 0.1, 0.4)
    widths = {}
    for scale in (1, 4):
        ratio = truth + scale * (noisy(truth, 7) - truth)
        fit = fit_law(D * 1e9, ratio, "silu", bootstrap=100)
        lo, hi = fit.a0_interval
        assert lo <= 0.4 <= hi
        widths[scale] = hi - lo
        covariance = fit_law(D * 1e9, ratio, "silu").a0_interval
        assert fit.a0_interval != pytest.approx(covariance, rel=1e-6)
        assert fit_law(D * 1e9, ratio, "silu", bootstrap=100) == fit  # fixed seed
    assert 2.5 < widths[4] / widths[1] < 6


def test_covariance_at_a_grid_start_is_curve_fits() -> None:
    """When no refinement beats a grid start, the fit's covariance is computed at that point:
    at a converged point it must equal curve_fit's own."""
    from sparsetrace.sparsing.laws import _FORMS, _covariance_at

    ratio = noisy(silu_law(D, 0.5, 0.1, 0.4), 8)
    popt, pcov = curve_fit(silu_law, D, ratio, p0=(0.4, 0.1, 0.45), maxfev=40000)
    free = np.array([-np.inf] * 3), np.array([np.inf] * 3)
    ours = _covariance_at(_FORMS["silu"], D, ratio, tuple(popt), *free)
    assert ours == pytest.approx(pcov, rel=1e-3)
    pinned = _covariance_at(_FORMS["silu"], D, ratio, tuple(popt), np.array([-np.inf, -np.inf,
                            popt[2]]), np.array([np.inf, np.inf, popt[2]]))  # fmt: skip
    assert pinned[2].tolist() == [0.0, 0.0, 0.0] and pinned[0, 0] > 0


def test_a_best_fit_no_refinement_reached_still_has_an_interval(monkeypatch) -> None:
    """Every curve_fit refinement failing leaves a grid start as the fit: its A0 interval comes
    from the covariance at that start, not NaN."""
    from sparsetrace.sparsing import laws

    def fails(form, d, y, p0, lower, upper, max_evals=3000):
        return tuple(np.clip(p0, lower, np.maximum(upper, lower))), None

    monkeypatch.setattr(laws, "_refine", fails)
    fit = fit_law(D * 1e9, noisy(silu_law(D, 0.5, 0.1, 0.4), 9), "silu")
    lo, hi = fit.a0_interval
    assert np.isfinite([lo, hi]).all() and lo < fit.limit < hi and fit.se["A0"] > 0


def test_bootstrap_of_a_relu_curve_near_zero_keeps_a0_physical() -> None:
    """Resamples of a ReLU curve converging to just above 0 (noise larger than its lowest point)
    dip below 0; their A0 stays at its floor 0 (it went to -1.3e-4 before)."""
    truth = relu_law(D, 1.0, -3.0, 0.05, 0.0008)
    ratio = truth + np.random.default_rng(10).normal(0.0, 3e-4, D.shape)
    assert 0 < ratio.min() < 3e-4
    fit = fit_law(D * 1e9, ratio, "relu", bootstrap=40)
    lo, hi = fit.a0_interval
    assert lo == 0.0 and lo <= fit.limit <= ratio.min() + 1e-12 and hi <= ratio.min() + 1e-12


def test_fit_law_on_a_run_drops_its_warm_up_checkpoints(tmp_path: Path, capsys) -> None:
    """A run directory: by default the checkpoints at or before the end of warm-up (its
    config.yaml) are left out; --skip-first 0 keeps them."""
    run = tmp_path / "run"
    run.mkdir()
    d = np.linspace(1.0, 50.0, 7)
    ratio = relu_law(d, 0.5, -1.0, 1.0, 0.1)
    rows = [{"step": 100 * (i + 1), "tokens": d[i] * 1e9, "layer": "all",
             "activation_ratio": ratio[i], "cett": 0.2, "ppl_ratio": 1.01}
            for i in range(len(d))]  # fmt: skip
    pd.DataFrame(rows).to_csv(run / "sparsing_law.csv", index=False)
    (run / "config.yaml").write_text("train:\n  warmup_steps: 200\n")  # steps 100, 200: warm-up
    verbs.fit_law(run, json=True)
    assert json.loads(capsys.readouterr().out)["skip_first"] == 2
    verbs.fit_law(run, skip_first=0, json=True)
    assert json.loads(capsys.readouterr().out)["skip_first"] == 0
    (run / "config.yaml").write_text("train:\n  warmup_steps: 300\n")  # 4 left: too few
    with pytest.raises(UserError, match="3 taken during warm-up"):
        verbs.fit_law(run)
    (run / "config.yaml").unlink()  # warm-up unknown: nothing dropped, and it says so
    verbs.fit_law(run, json=True)
    captured = capsys.readouterr()
    assert json.loads(captured.out)["skip_first"] == 0 and "warm-up unknown" in captured.err


# --------------------------------------------------------------------------------------------------
# The authors' published curves (tests/data/sparsing_law, SOURCE.md) and parameters (their
# calc.py CURVE_PARAM = the paper's Table 2): (alpha, b, c, A0) and (alpha, c, A0).

CURVES = Path(__file__).parent / "data" / "sparsing_law"
PAPER = {
    "relu_0.1B": (0.101, -0.0151, 3.20, 0.0614), "relu_0.2B": (0.449, -3.05, 0.286, 0.0674),
    "relu_0.4B": (0.683, -3.46, 0.0790, 0.0690), "relu_0.8B": (1.01, -3.49, 0.00797, 0.0721),
    "relu_1.2B": (1.33, -3.89, 0.000903, 0.0782),
    "silu_0.1B": (0.479, 0.102, 0.409), "silu_0.2B": (0.844, 0.208, 0.390),
    "silu_0.4B": (1.03, 0.420, 0.385), "silu_0.8B": (0.995, 0.562, 0.383),
    "silu_1.2B": (0.967, 0.538, 0.382),
}  # fmt: skip


def _curve(name: str) -> tuple[np.ndarray, np.ndarray]:
    frame = pd.read_csv(CURVES / f"{name}.csv")
    return frame["tokens"].to_numpy(), frame["activation_ratio"].to_numpy()


@pytest.mark.parametrize("name", list(PAPER))
def test_published_curves_physical_limit_no_worse_than_the_paper(name: str) -> None:
    """On every published curve: the limit is physical (ReLU 0 <= A0 <= lowest ratio; SiLU A0 >=
    highest) and the fit's MSE over all points is no worse than the paper's own parameters'."""
    tokens, ratio = _curve(name)
    form = name.split("_")[0]
    fit = fit_law(tokens, ratio, form)
    a0 = fit.limit
    if form == "relu":
        assert 0.0 <= a0 <= ratio.min()
    else:
        assert a0 >= ratio.max()
    law = relu_law if form == "relu" else silu_law
    paper_mse = float(np.mean((law(tokens / 1e9, *PAPER[name]) - ratio) ** 2))
    assert fit.mse_all <= paper_mse * (1 + 1e-9)
    lo, hi = fit.a0_interval
    assert lo <= a0 <= hi
    assert fit.baselines["log"].mse >= fit.mse  # the power law beats the log baseline


@pytest.mark.parametrize(
    ("name", "skip"), [("relu_1.2B", 6), ("silu_0.1B", 5), ("silu_0.2B", 6), ("silu_0.4B", 8)]
)
def test_the_papers_parameters_come_back_with_its_dropped_checkpoints(name: str, skip: int) -> None:
    """With the early checkpoints the authors dropped (1.2B ReLU: 6, their calc.py; the SiLU
    counts found by refitting), the bounded fit returns the published parameters."""
    tokens, ratio = _curve(name)
    fit = fit_law(tokens, ratio, name.split("_")[0], skip_first=skip)
    paper = PAPER[name]
    assert fit.skip == skip
    assert fit.params["alpha"] == pytest.approx(paper[0], rel=0.01)
    assert fit.limit == pytest.approx(paper[-1], abs=5e-4)


def test_unbounded_limit_would_be_unphysical_and_the_bound_says_so() -> None:
    """The authors' 0.4B ReLU curve does not determine its limit: unbounded, least squares
    drives A0 below zero; bounded, A0 sits on 0 and the fit says the limit is undetermined."""
    tokens, ratio = _curve("relu_0.4B")
    with np.errstate(all="ignore"):  # the authors' method: Levenberg-Marquardt, no bounds
        free, _ = curve_fit(relu_law, tokens / 1e9, ratio, p0=PAPER["relu_0.4B"], maxfev=40000)
    assert free[3] < 0  # a negative limit activation ratio
    fit = fit_law(tokens, ratio, "relu")
    assert fit.limit_on_bound and fit.limit == pytest.approx(0.0, abs=1e-4)
    assert fit.limit_undetermined == "limit A0 on its physical bound beyond the data"
    assert fit.a0_interval[1] <= ratio.min() + 1e-12
    # the limit is not identified: dropping the first point moves it from 0 to 0.065
    assert fit_law(tokens, ratio, "relu", skip_first=1).limit > 0.06
    well = fit_law(*_curve("relu_0.8B"), "relu")
    assert not well.limit_on_bound


@pytest.mark.slow
def test_an_interval_spanning_the_whole_range_is_flagged_as_undetermined() -> None:
    """The `cpu` preset's PPL-1% curve (fresh-clone `make run`, 2026-12-01): still falling at 2M
    tokens, its ReLU fit puts A0 inside the range but the interval reaches both 0 and the lowest
    point — the limit is not determined, and the fit says so; a converged curve is not flagged."""
    tokens = 256_000 * np.arange(1, 9)
    ratio = np.array([28.9455, 20.3391, 17.9281, 16.5304, 14.9254, 14.0185, 13.0333, 12.1545])
    fit = fit_law(tokens, ratio / 100, "relu")
    assert not fit.limit_on_bound
    assert fit.limit_undetermined == "the 95 % interval of A0 spans its whole physical range"
    well = fit_law(D * 1e9, noisy(relu_law(D, 0.683, -3.46, 0.079, 0.069), 11), "relu")
    assert well.limit_undetermined == "" and well.a0_interval[1] - well.a0_interval[0] < 0.01
    from dataclasses import replace

    blind = replace(well, a0_interval=(float("nan"), float("nan")))  # covariance not finite
    assert blind.limit_undetermined.startswith("no interval for A0")


def test_silu_limit_is_a_share_of_units() -> None:
    """A SiLU curve still rising as fast as at its start (log-linear, like the `cpu` preset's
    gated SiLU over 2M tokens) does not determine its limit: bounded only below, least squares
    puts A0 above 1 — more than all units; bounded by 1 too, A0 sits on that bound and says so."""
    tokens = np.geomspace(2.56e5, 2.048e6, 8)
    ratio = 0.20 + 0.012 * np.log(tokens / tokens[0])
    d = tokens / 1e9
    with np.errstate(all="ignore"):
        lower = [1e-6, 0.0, ratio.max()]  # alpha, c, A0: A0 bounded below only
        free, _ = curve_fit(silu_law, d, ratio, p0=(0.05, 0.01, 0.5), maxfev=40000,
                            bounds=(lower, [np.inf] * 3))  # fmt: skip
    assert free[2] > 1
    fit = fit_law(tokens, ratio, "silu")
    assert ratio.max() <= fit.limit <= 1 and fit.limit_on_bound
    assert not fit.limit_flat and fit.limit_undetermined.startswith("limit A0 on its physical")


# --------------------------------------------------------------------------------------------------
# The training-loss law L(D) = L_inf + B * D**(-beta): per-step losses after warm-up


def _losses(steps: np.ndarray, l_inf: float, b: float, beta: float, noise: float, seed: int):
    tokens = steps * 2048.0  # the cpu preset's tokens per step
    truth = loss_law(tokens / 1e9, l_inf, b, beta)
    return tokens, truth, truth + np.random.default_rng(seed).normal(0.0, noise, truth.shape)


def test_loss_law_recovered() -> None:
    # 900 steps after warm-up: the loss falls from 4.2 to 3.7, per-step noise 0.02
    tokens, truth, loss = _losses(np.arange(100, 1000), 3.5, 0.01, 0.5, 0.02, 4)
    fit = fit_loss_law(tokens, loss)
    assert fit.limit == pytest.approx(3.5, abs=0.05)
    assert fit.params["beta"] == pytest.approx(0.5, rel=0.1)
    assert fit.params["B"] == pytest.approx(0.01, rel=0.5)  # B = excess * D0**beta: trades off
    assert fit.interval[0] <= 3.5 <= fit.interval[1] and fit.se["L_inf"] > 0
    p = fit.params
    assert np.abs(loss_law(tokens / 1e9, p["L_inf"], p["B"], p["beta"]) - truth).max() < 0.01
    assert not fit.limit_on_bound and fit.limit_undetermined == ""
    assert fit_loss_law(tokens, loss) == fit  # deterministic


def test_loss_law_still_falling_steeply_has_its_limit_below_the_last_loss() -> None:
    # 200 steps of a steep fall, 8.0 -> 4.9 nats, still 0.2 per 40 steps at the end
    tokens, truth, loss = _losses(np.arange(50, 250), 3.0, 0.02, 0.6, 0.01, 5)
    fit = fit_loss_law(tokens, loss)
    assert fit.interval[1] < truth[-1] - 0.5  # well below the last value, not on the data
    assert fit.interval[0] <= 3.0 <= fit.interval[1]
    flat = fit_loss_law(tokens, 4.0 + np.random.default_rng(6).normal(0.0, 0.01, len(tokens)))
    assert flat.limit_on_bound and flat.limit == pytest.approx(flat.bounds[1])  # = lowest loss
    assert flat.limit_undetermined == "L_inf on its bound"
    # a slow decay (beta 0.1, 4.34 -> 3.86 nats over 900 steps; noise 0.1): its fit cannot rule
    # out L_inf = 0 (the truth is 2.0), so the limit is not determined
    slow_tokens, _, slow = _losses(np.arange(100, 1000), 2.0, 1.0, 0.1, 0.1, 7)
    noisy = fit_loss_law(slow_tokens, slow)
    assert noisy.interval[0] == 0.0 and not noisy.limit_on_bound
    assert noisy.limit_undetermined == "the 95 % interval of L_inf reaches 0"
    with pytest.raises(ValueError, match=">= 0"):
        fit_loss_law(tokens, -loss)
    with pytest.raises(ValueError, match="at least 5"):
        fit_loss_law(tokens[:4], loss[:4])


# --------------------------------------------------------------------------------------------------
# The width-depth bottleneck: the continuous two-segment line across arms

RATIOS = np.array([2.9, 6.7, 13.3, 24.0, 51.2, 106.7, 192.0, 544.0])  # the cpu default arms


def test_bottleneck_recovered_from_a_rise_that_stops() -> None:
    limits = two_segment(RATIOS, 0.05, 1e-3, 0.0, 114.0)
    intervals = np.stack([limits - 0.002, limits + 0.002], axis=1)
    fit = fit_bottleneck(RATIOS, limits, intervals)
    assert fit.r_star == pytest.approx(114.0, abs=2.0)  # the grid: 50 points from 106.7 to 192
    assert fit.below == pytest.approx(1e-3, rel=0.02) and fit.above == pytest.approx(0, abs=1e-5)
    low, high = fit.intervals["r_star"]
    assert low <= fit.r_star <= high and high - low < 40
    assert fit.intervals["difference"][1] < 0 < fit.intervals["below"][0]
    assert np.abs(fit.curve(RATIOS) - limits).max() < 1e-3
    assert fit_bottleneck(RATIOS, limits, intervals) == fit  # fixed seed
    exact = fit_bottleneck(RATIOS, limits, np.stack([limits, limits], axis=1))  # no width
    assert exact.intervals["below"] == (pytest.approx(exact.below),) * 2
    with pytest.raises(ValueError, match="3 distinct"):
        fit_bottleneck([4.0, 4.0, 8.0], [0.1, 0.1, 0.2], [(0.1, 0.1)] * 3)


def test_bottleneck_draws_stay_within_each_interval() -> None:
    # Every limit exact but the widest arm's, which sits on its upper bound (one-sided interval):
    # its draws only go down, so the straight slope's draws never exceed the fitted one.
    limits = two_segment(RATIOS, 0.05, 1e-3, 0.0, 114.0)
    intervals = np.stack([limits, limits], axis=1)
    intervals[-1, 0] -= 0.01
    fit = fit_bottleneck(RATIOS, limits, intervals)
    low, high = fit.intervals["linear"]
    assert low < fit.linear and high == pytest.approx(fit.linear, abs=1e-15)


@pytest.mark.slow
def test_a_flattened_curve_has_its_limit_at_the_data() -> None:
    """The `cpu`-scale width-depth arm 256x5 (2026-12-02; PPL-1% ratio every 125 steps, 2,048
    tokens a step): flat from step 500, so the ReLU law's A0 sits on its bound at the data, the
    lowest observed ratio — a determined limit, unlike A0 on 0 (a curve still falling)."""
    tokens = 256_000 * np.arange(1, 9)
    ratio = np.array([0.0970, 0.0728, 0.0608, 0.0547, 0.0548, 0.0535, 0.0541, 0.0533])
    fit = fit_law(tokens, ratio, "relu")
    assert fit.limit_on_bound and fit.limit_flat
    assert fit.limit == pytest.approx(ratio.min()) and fit.limit_undetermined == ""
    falling = fit_law(tokens, ratio * np.linspace(1.0, 0.6, 8), "relu")  # still falling at -7 %
    assert not falling.limit_flat
    pinned = fit_law(tokens, np.array([0.3, 0.2, 0.1, 0.05, 0.02, 0.0, 0.0, 0.0]), "relu")
    assert pinned.limit == 0.0 and pinned.limit_flat  # reached 0: flat at 0, determined
    assert pinned.limit_undetermined == ""


def _law_dir(path: Path, meta: dict | None, tokens_known: bool = True) -> Path:
    """A result directory with six points of a falling curve (steps 1..6, 8 billion tokens each)
    and ``meta.json``."""
    path.mkdir()
    d = np.arange(1, 7) * 8.0
    ratio = relu_law(d, 0.5, -1.0, 1.0, 0.1)
    rows = [{"step": i + 1, "tokens": d[i] * 1e9 if tokens_known else None, "layer": "all",
             "activation_ratio": ratio[i], "cett": 0.2, "ppl_ratio": 1.01}
            for i in range(len(d))]  # fmt: skip
    pd.DataFrame(rows).to_csv(path / "sparsing_law.csv", index=False)
    if meta is not None:
        (path / "meta.json").write_text(json.dumps(meta))
    return path


def test_the_activation_of_a_directory_without_a_config_comes_from_its_meta(tmp_path: Path) -> None:
    """An analyze or Hugging Face sparsing-law directory names its activation in meta.json only:
    its law form follows it; an activation without a form is no fit, said, not an error."""
    from sparsetrace.sparsing.laws import run_law_form
    from sparsetrace.sparsing.verbs import _fit_over_training

    silu = _law_dir(tmp_path / "silu", {"model": {"activation": "gelu_new"}})
    assert run_law_form(silu) == "silu"
    assert _fit_over_training(silu, {"checkpoints": [{}] * 6, "x": "tokens"}).startswith("silu law")
    tanh = _law_dir(tmp_path / "tanh", {"model": {"activation": "tanh"}})
    line = _fit_over_training(tanh, {"checkpoints": [{}] * 6, "x": "tokens"})
    assert line.startswith("law fit: none (no Sparsing Law form for activation 'tanh'")
    assert not list(tanh.glob("*.png"))
    unknown = _law_dir(tmp_path / "unknown", None)
    assert "activation is unknown" in _fit_over_training(unknown, {"checkpoints": [{}] * 6})


def test_a_curve_without_tokens_is_fitted_over_steps(tmp_path: Path) -> None:
    """Tokens per step unknown (tokens empty): the law over steps, with the same A0 and alpha as
    over tokens (the unit of D scales c alone)."""
    steps = _law_dir(tmp_path / "steps", None, tokens_known=False)
    tokens, ratio = read_law_data(steps)
    assert list(tokens) == [1, 2, 3, 4, 5, 6]
    by_steps = fit_law(tokens, ratio, "relu")
    by_tokens = fit_law(tokens * 8e9, ratio, "relu")
    assert by_steps.limit == pytest.approx(by_tokens.limit, abs=1e-6)
    assert by_steps.params["alpha"] == pytest.approx(by_tokens.params["alpha"], rel=1e-4)


def test_the_fit_line_says_when_the_limit_is_only_the_last_level(tmp_path: Path) -> None:
    """A curve still falling by 0.1 point at its end (the README example's ReLU GPT-2 series)
    puts A0 on its lowest point: the line says so; a curve of the law itself does not."""
    from sparsetrace.sparsing.verbs import _fit_over_training

    falling = _law_dir(tmp_path / "law", {"model": {"activation": "relu"}})
    line = _fit_over_training(falling, {"checkpoints": [{}] * 6, "x": "tokens"})
    assert "flattened" not in line and "does not determine" not in line
    flat = tmp_path / "flat"
    flat.mkdir()
    ratio = [0.2591, 0.2434, 0.2277, 0.2233, 0.2196, 0.2188]
    rows = [{"step": 50 * (i + 1), "tokens": 25600.0 * (i + 1), "layer": "all",
             "activation_ratio": r, "cett": 0.2, "ppl_ratio": 1.01}
            for i, r in enumerate(ratio)]  # fmt: skip
    pd.DataFrame(rows).to_csv(flat / "sparsing_law.csv", index=False)
    (flat / "meta.json").write_text(json.dumps({"model": {"activation": "relu"}}))
    line = _fit_over_training(flat, {"checkpoints": [{}] * 6, "x": "tokens"})
    assert "A0 = 0.2188" in line and "the curve has flattened" in line
