"""Sparsing Law experiments: activation functions over training, width/depth at one budget.

Parameter counts and the budget solver by hand, the ReLU-falls / SiLU-rises check on synthetic
curves, and both experiments end to end on the tiny preset (arms typed, reports written, a second
call neither trains nor measures again)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sparsetrace.claims import FAILS, HOLDS, INCONCLUSIVE, NA
from sparsetrace.claims.sparsing import check_finding, trend
from sparsetrace.config import load_config
from sparsetrace.errors import UserError
from sparsetrace.experiments import activations, runs, width_depth
from sparsetrace.model.transformer import Transformer
from sparsetrace.sparsing.laws import law_form

# tiny preset, 16 steps, a checkpoint every 2 (8 points); 1,024 validation tokens measured
SHORT = ["--train.steps", "16", "--eval.every", "8"]
TOKENS = 1024


@pytest.fixture(autouse=True)
def _small(tmp_path_factory, monkeypatch) -> None:
    monkeypatch.setenv("SPARSETRACE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead on a shared machine
    yield
    torch.set_num_threads(threads)


def _no_call(*_args, **_kwargs) -> None:
    raise AssertionError("a finished arm was trained or measured again")


def test_non_embedding_params_by_hand() -> None:
    m = load_config("cpu-gpt2").model  # 6 layers, d_model 128, d_ff 2048, ReLU, biases, LayerNorm
    attention = 4 * 128 * 128 + 4 * 128  # qkv and output projection with biases
    mlp = 128 * 2048 + 2048 + 2048 * 128 + 128
    norms = 2 * 2 * 128  # two LayerNorms, gain and bias
    assert width_depth.block_params(m, 2048) == attention + mlp + norms == 593_024
    assert width_depth.non_embedding_params(m) == 6 * 593_024 + 256 == 3_558_400
    for cfg in (load_config("tiny"), load_config("tiny", ["--model.activation", "swiglu",
                                                         "--model.style", "t5"])):  # fmt: skip
        model = Transformer(cfg.model.with_data(vocab_size=50, seq_len=32))
        embeddings = sum(
            p.numel() for name, p in model.named_parameters() if "emb" in name or "rel_" in name
        )
        assert width_depth.non_embedding_params(cfg.model) == model.num_params() - embeddings


def test_shape_for_ratio_keeps_the_budget() -> None:
    base = load_config("cpu").model  # head dimension 32, no biases, RMSNorm
    budget = width_depth.non_embedding_params(base)
    assert budget == 6 * (4 * 128**2 + 2 * 128 * 2048 + 2 * 128) + 128 == 3_540_608
    # d_model = (3,540,608 * 50 / 11.5) ** (1/3) = 249 -> 256 (8 heads), d_ff 640;
    # a block: 4*256^2 + 256*1280 + 640*256 + 2*256 = 754,176 -> 4.69 -> 5 layers
    shape = width_depth.shape_for_ratio(base, budget, 50, "swiglu")
    assert shape == width_depth.ArmShape(d_model=256, n_layers=5, n_heads=8, d_ff=640)
    assert shape.ratio == 51.2
    # ratio 8: d_model 135 -> 128, block 188,672 (4*128^2 + 128*640 + 320*128 + 2*128)
    # -> 18.77 -> 19 layers
    assert width_depth.shape_for_ratio(base, budget, 8, "swiglu") == width_depth.ArmShape(
        128, 19, 4, 320
    )
    # one layer is the widest the budget holds: sqrt(3,540,608 / 11.5) = 555 -> 544 x 1
    widest = width_depth.ArmShape(544, 1, 17, 1360)
    assert width_depth.shape_for_ratio(base, budget, 512, "reglu") == widest
    assert width_depth.shape_for_ratio(base, budget, 5000, "reglu") == widest
    with pytest.raises(UserError, match="positive"):
        width_depth.parse_ratios("4,-1")


def _law_csv(path: Path, ratios: list[float], tokens: list[float] | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    tokens = tokens or [2048 * 2**i for i in range(len(ratios))]
    rows = [{"step": i + 1, "tokens": t, "layer": layer,
             "activation_ratio": r + (layer != "all") * 0.5, "cett": 0.1, "ppl_ratio": 1.01}
            for i, (t, r) in enumerate(zip(tokens, ratios, strict=True))
            for layer in ("all", "0")]  # fmt: skip
    pd.DataFrame(rows).to_csv(path / "sparsing_law.csv", index=False)
    return path / "sparsing_law.csv"


@pytest.mark.slow
def test_finding_check_flips_with_the_direction(tmp_path: Path) -> None:
    falling = [0.40, 0.35, 0.31, 0.28, 0.26, 0.25]
    rising = falling[::-1]
    t = trend(*activations.layer_mean(_law_csv(tmp_path / "f", falling))[1:])
    assert t.direction == "falls" and t.slope < 0 and t.first == pytest.approx(0.353333, 1e-4)

    def curves(relu: list[float], silu: list[float]) -> list:
        return [
            activations.law_curve(name, law_form(name),
                                  _law_csv(tmp_path / f"{name}-{relu[0]}", values), 0)
            for name, values in (("relu", relu), ("silu", silu))
        ]  # fmt: skip

    shown = check_finding(curves(falling, rising))
    assert shown.outcome == HOLDS and "relu: falls" in shown.evidence
    assert check_finding(curves(rising, falling)).outcome == FAILS
    assert check_finding(curves(falling, falling)).outcome == FAILS  # silu moves the wrong way
    one = check_finding(curves(falling, rising)[:1])  # one family only: the claim contrasts two
    assert one.outcome == INCONCLUSIVE and "both families" in one.decide
    few = activations.law_curve("silu", "silu", _law_csv(tmp_path / "few", [0.3]), 0)
    assert few.fit is None and check_finding([few]).outcome == NA
    short = activations.law_curve("gelu", "silu", _law_csv(tmp_path / "short", [0.2, 0.3, 0.4]), 0)
    assert short.fit is None and "needs at least 5" in short.note
    assert check_finding([short]).outcome == INCONCLUSIVE
    assert law_form("swiglu") == "silu" and law_form("reglu") == "relu"
    with pytest.raises(UserError):
        law_form("tanh")


def test_law_curve_drops_the_warm_up_checkpoints(tmp_path: Path) -> None:
    """The authors' rule: checkpoints taken at or before the end of warm-up stay on the curve
    but out of the fit; the fit equals one on the later points alone."""
    from sparsetrace.sparsing.laws import fit_law, relu_law

    tokens = np.geomspace(1e8, 1e11, 9)
    ratios = list(relu_law(tokens / 1e9, 0.5, -1.0, 3.0, 0.05))
    ratios[:2] = [0.9, 0.6]  # warm-up transients the law does not describe
    csv = _law_csv(tmp_path / "w", ratios, list(tokens))  # steps 1..9
    curve = activations.law_curve("relu", "relu", csv, warmup_steps=2)
    assert curve.fit is not None and curve.fit.skip == 2 and len(curve.ratio) == 9
    alone = fit_law(tokens[2:], np.array(ratios[2:]), "relu")
    assert curve.fit.params == pytest.approx(alone.params, rel=1e-6)
    assert curve.fit.limit == pytest.approx(0.05, abs=1e-3)
    assert activations.law_curve("relu", "relu", csv, warmup_steps=0).fit.skip == 0
    late = activations.law_curve("relu", "relu", csv, warmup_steps=5)  # 4 left after warm-up
    assert late.fit is None and "5 of them during warm-up" in late.note


def test_experiments_default_to_the_papers_architectures() -> None:
    """The paper's models are gated (act(gate) * up): ReLU vs SiLU compares reglu with swiglu;
    width-depth uses gated ReLU with default ratios on both sides of its bottleneck (~114)."""
    import inspect

    from sparsetrace.experiments import verbs
    from sparsetrace.model.transformer import GATED

    def default(verb, name: str):
        return inspect.signature(verb).parameters[name].default

    compared = default(verbs.experiment_activations, "activations").split(",")
    assert {law_form(a) for a in compared} == {"relu", "silu"} and set(compared) <= set(GATED)
    activation = default(verbs.experiment_width_depth, "activation")
    assert activation in GATED and law_form(activation) == "relu"
    base = load_config("cpu").model
    budget = width_depth.non_embedding_params(base)
    shapes = [width_depth.shape_for_ratio(base, budget, r, activation)
              for r in width_depth.parse_ratios(width_depth.DEFAULT_RATIOS)]  # fmt: skip
    below = [s for s in shapes if s.ratio < 114]
    assert len(below) >= 4 and len(shapes) - len(below) >= 2  # the rise and past it


@pytest.mark.slow
def test_activations_experiment_end_to_end(tmp_path: Path, monkeypatch) -> None:
    args = ("tiny", "relu,silu", 1.0, TOKENS, False, tmp_path, SHORT)
    index = activations.run_activations_experiment(*args)
    assert index == tmp_path / "report" / "index.html" and index.is_file()
    for name in ("report.md", "figures/activation_ratio.png", "tables/laws.csv"):
        assert (index.parent / name).is_file(), name
    laws = pd.read_csv(index.parent / "tables" / "laws.csv", index_col=0)
    assert list(laws.index) == ["relu", "silu"] and (laws["checkpoints"] == 8).all()
    assert list(laws["law"]) == ["relu", "silu"] and laws["MSE"].notna().all()
    assert laws[["A0 low", "A0 high"]].notna().all().all()
    assert (laws["A0 low"] <= laws["A0"] + 1e-12).all()
    assert (laws["A0"] <= laws["A0 high"] + 1e-12).all()
    assert (laws["A0"] >= 0).all() and (laws["A0"] <= 1).all()  # a share of units
    # Each row refitted here from its arm's CSV: the mean over layers, the points after warm-up
    from sparsetrace.sparsing.laws import fit_law

    warm = load_config("tiny", SHORT).train.warmup_steps
    for name in ("relu", "silu"):
        frame = pd.read_csv(tmp_path / f"model.activation={name}" / "sparsing_law.csv",
                            dtype={"layer": str})  # fmt: skip
        frame = frame[frame["tokens"] > 0]
        rows = frame[frame["layer"] == "all"].sort_values("tokens").set_index("step")
        by_layer = frame[frame["layer"] != "all"].groupby("step")["activation_ratio"].mean()
        assert rows["activation_ratio"].tolist() == pytest.approx(by_layer[rows.index].tolist())
        assert laws.loc[name, "final activation ratio"] == pytest.approx(
            rows["activation_ratio"].iloc[-1]
        )
        skip = int((rows.index.to_numpy() <= warm).sum())
        assert laws.loc[name, "warm-up points dropped"] == skip
        fit = fit_law(rows["tokens"].to_numpy(float), rows["activation_ratio"].to_numpy(float),
                      name, skip_first=skip)  # fmt: skip
        assert laws.loc[name, "A0"] == pytest.approx(fit.params["A0"], rel=1e-6)
    assert "Sparsing Law finding on these runs" in (index.parent / "report.md").read_text()
    cfg = load_config("tiny", SHORT)
    assert runs.status(tmp_path / "model.activation=silu", cfg.train.steps) == "finished"
    monkeypatch.setattr(runs, "train", _no_call)
    monkeypatch.setattr(activations, "sparsing_law", _no_call)
    assert activations.run_activations_experiment(*args) == index
    arm = tmp_path / "model.activation=silu"
    assert activations.measure(arm, 1.0, TOKENS, activations.LAST) == arm / "sparsing_law.csv"
    for p, tokens in ((1.0, 2 * TOKENS), (2.0, TOKENS)):  # measured at other settings: again
        with pytest.raises(AssertionError, match="measured again"):
            activations.measure(arm, p, tokens, activations.LAST)
    summary = json.loads((arm / "sparsing_law.json").read_text())
    del summary["windows"]  # a file from before the windows were recorded: contiguous ones
    (arm / "sparsing_law.json").write_text(json.dumps(summary))
    with pytest.raises(AssertionError, match="measured again"):
        activations.measure(arm, 1.0, TOKENS, activations.LAST)
    with pytest.raises(UserError, match="another experiment"):
        activations.run_activations_experiment("tiny", "relu", 1.0, TOKENS, False, tmp_path, SHORT)


@pytest.mark.slow
def test_width_depth_experiment_end_to_end(tmp_path: Path, monkeypatch) -> None:
    # tiny budget 25,472: ratio 4 -> 16 x 8 layers, ratio 16 -> 32 x 2; ratio 17 gives 32 x 2 too
    args = ("tiny", "4,16,17", "swiglu", 1.0, TOKENS, False, tmp_path, SHORT)
    index = width_depth.run_width_depth_experiment(*args)
    table = pd.read_csv(index.parent / "tables" / "width_depth.csv", index_col=0)
    assert list(table.index) == ["d_model=16+n_layers=8", "d_model=32+n_layers=2"]
    assert list(table["width-depth ratio"]) == [2.0, 16.0]
    assert list(table["d_ff"]) == [40, 80] and list(table["n_heads"]) == [1, 2]
    assert np.all(np.abs(table["parameters"] - 25_472) < 0.2 * 25_472)
    assert table["final activation ratio"].between(0, 1).all()
    # every arm over training: CHECKPOINTS checkpoints, the silu law's limit at or above the
    # curve (its bound), a limit loss below the final training loss
    assert (table["checkpoints"] == activations.CHECKPOINTS).all()
    for arm in table.index:
        assert len(list((tmp_path / arm / "checkpoints").iterdir())) == activations.CHECKPOINTS
    assert (table["A0 low"] <= table["limit A0"]).all()
    assert (table["limit A0"] <= table["A0 high"]).all()
    assert (table["limit A0"] >= table["final activation ratio"] - 1e-9).all()
    assert (table["L_inf low"] <= table["limit loss"]).all()
    assert (table["limit loss"] <= table["L_inf high"]).all() and (table["L_inf low"] >= 0).all()
    assert (table["limit loss"] <= table["train loss (last 5 %)"]).all()
    # Each arm refitted here from its CSV: the silu form (swiglu), the points after warm-up
    from sparsetrace.sparsing.laws import fit_law

    warm = load_config("tiny", SHORT).train.warmup_steps
    for arm in table.index:
        frame = pd.read_csv(tmp_path / arm / "sparsing_law.csv", dtype={"layer": str})
        rows = frame[(frame["layer"] == "all") & (frame["tokens"] > 0)].sort_values("tokens")
        ratio = rows["activation_ratio"].to_numpy(float)
        assert table.loc[arm, "final activation ratio"] == pytest.approx(ratio[-1])
        skip = int((rows["step"].to_numpy() <= warm).sum())
        fit = fit_law(rows["tokens"].to_numpy(float), ratio, "silu", skip_first=skip)
        assert table.loc[arm, "limit A0"] == pytest.approx(fit.limit, rel=1e-6)
    assert (index.parent / "figures" / "width_depth.png").is_file()
    text = (index.parent / "report.md").read_text()
    assert "Sparsing Law on these arms: n/a" in text and "needs at least 4" in text
    assert "no middle range to compare" in text  # two arms
    monkeypatch.setattr(runs, "train", _no_call)
    monkeypatch.setattr(activations, "sparsing_law", _no_call)
    assert width_depth.run_width_depth_experiment(*args) == index
    with pytest.raises(UserError, match="gated"):
        width_depth.run_width_depth_experiment("tiny", "4", "relu", 1.0, TOKENS, False,
                                               tmp_path, SHORT)  # fmt: skip
    with pytest.raises(UserError, match="--ratios"):
        width_depth.run_width_depth_experiment("tiny", "4,wide", "reglu", 1.0, TOKENS, False,
                                               tmp_path, SHORT)  # fmt: skip


def test_activations_report_flags_an_undetermined_limit(tmp_path: Path) -> None:
    """A SiLU curve still rising log-linearly puts A0 on its bound 1 and the table says so; a
    converging one (the law with A0 = 0.4) gets its limit and no such note."""
    from sparsetrace.report.sparsing import write_activations_report
    from sparsetrace.sparsing.laws import silu_law

    def curve(name: str, ratios: np.ndarray, tokens: np.ndarray):
        path = tmp_path / name
        path.mkdir()
        pd.DataFrame({"step": range(1, len(tokens) + 1), "tokens": tokens, "layer": "all",
                      "activation_ratio": ratios, "cett": 0.1, "ppl_ratio": 1.01}
                     ).to_csv(path / "sparsing_law.csv", index=False)  # fmt: skip
        return activations.law_curve(name, "silu", path / "sparsing_law.csv", 0)

    tokens = np.geomspace(1e9, 1e11, 8)
    rising = curve("rising", 0.20 + 0.012 * np.log(tokens / tokens[0]), tokens)
    converging = curve("converging", silu_law(tokens / 1e9, 0.5, 0.1, 0.4), tokens)
    index = write_activations_report(tmp_path / "out", [rising, converging], 1.0)
    laws = pd.read_csv(index.parent / "tables" / "laws.csv", index_col=0)
    assert laws.loc["rising", "A0"] == pytest.approx(1.0, abs=1e-3)
    assert "on its physical bound" in laws.loc["rising", "note"]
    assert laws.loc["converging", "A0"] == pytest.approx(0.4, abs=1e-3)
    assert pd.isna(laws.loc["converging", "note"])


def test_lowest_limit_loss_ignores_limits_the_curves_do_not_determine() -> None:
    """Only arms whose limit loss is determined compete: an undetermined arm's lower estimate
    (its interval reaching 0) does not make it the lowest; below 3 determined arms, no claim."""
    from sparsetrace.report.sparsing import RATIO, lowest_limit_loss

    frame = pd.DataFrame(
        {RATIO: [3.0, 7.0, 13.0, 24.0, 51.0],
         "limit loss": [3.2, 0.9, 2.4, 2.1, 2.8],
         "L_inf low": [3.0, 0.0, 2.2, 1.9, 2.5], "L_inf high": [3.4, 2.4, 2.6, 2.3, 3.1],
         "L_inf undetermined": ["", "the 95 % interval of L_inf reaches 0", "", "", ""]},
        index=["a", "b", "c", "d", "e"],
    )  # fmt: skip
    text = lowest_limit_loss(frame)
    assert text.startswith("Of the 4 arms whose limit loss is determined")
    assert "lowest at width-depth ratio 24 (d: L_inf = 2.1000" in text
    assert "an intermediate ratio" in text
    frame["L_inf undetermined"] = ["", "x", "y", "", ""]
    edge = lowest_limit_loss(frame)  # a, d, e: the lowest (d) is intermediate again
    assert "Of the 3 arms" in edge and "(d:" in edge
    frame["L_inf undetermined"] = ["", "x", "y", "z", ""]
    assert lowest_limit_loss(frame).startswith("2 of 5 arms have a limit loss their curve")
