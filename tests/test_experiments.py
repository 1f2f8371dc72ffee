"""The masking experiment (paper 4.1.1) and physical pruning: forks, masks, statistics, resume,
pruned == masked (logits, training), optimizer and tracker slicing by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from scipy import stats

from sparsetrace.checkpoint import checkpoint_path, load_trained_model
from sparsetrace.claims import RULES
from sparsetrace.claims.stats import detectable_effect
from sparsetrace.config import load_config
from sparsetrace.errors import UserError
from sparsetrace.experiments import mask, prune, runs
from sparsetrace.model.transformer import Transformer
from sparsetrace.rundir import load_run
from sparsetrace.tracking import LifecycleTracker
from sparsetrace.train import runmeta
from sparsetrace.train.parallelize import full_optimizer_state

K = 10  # tiny preset: 20 steps, evaluations at 10 and 20
ARGS = {"preset": "tiny", "at": K, "quick": False, "overrides": None}


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARSETRACE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        yield


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    """Two seeds of control, dead, random and pruned on the tiny preset, masked at step 10."""
    out = tmp_path_factory.mktemp("mask")
    mask.run_mask_experiment(seeds=2, prune=True, out=out, **ARGS)
    return out


def _train_rows(run_dir: Path) -> pd.DataFrame:
    return load_run(run_dir).train.drop(columns="step_time_s").set_index("step")


def _no_training(*_args, **_kwargs) -> None:
    raise AssertionError("a finished arm was trained again")


def test_default_mask_step() -> None:
    t = load_config("cpu").train
    t.steps, t.warmup_steps = 2000, 200
    assert mask.default_mask_step(t) == 500  # a quarter of training
    t.warmup_steps = 400
    assert mask.default_mask_step(t) == 800  # at least two warm-ups
    t.warmup_steps, t.steps = 10, 15
    assert mask.default_mask_step(t) == 14  # always before the last step


def test_arms_fork_from_an_identical_prefix(experiment: Path) -> None:
    for seed in (0, 1):
        control = _train_rows(experiment / f"control-seed{seed}")
        for arm in ("dead", "random", "pruned"):
            other = _train_rows(experiment / f"{arm}-seed{seed}")
            # Rows before K are the control's; step K itself was recomputed after the fork from
            # the copied checkpoint (the mask applies from K + 1 on): identical too (the pruned
            # model's other matrix shapes may round differently).
            pd.testing.assert_frame_equal(
                other.loc[: K - 1], control.loc[: K - 1], check_exact=True
            )
            pd.testing.assert_frame_equal(
                other.loc[K:K], control.loc[K:K], check_exact=arm != "pruned", atol=1e-6
            )
            assert not other.loc[K + 1 :].equals(control.loc[K + 1 :])  # the masks act
    # The seeds differ (data order and initialisation).
    assert not _train_rows(experiment / "control-seed0").equals(
        _train_rows(experiment / "control-seed1")
    )


def test_random_mask_has_the_dead_mask_size_per_layer(experiment: Path) -> None:
    for seed in (0, 1):
        dead, rand = (
            json.loads((experiment / f"{arm}-seed{seed}/mask.json").read_text())
            for arm in ("dead", "random")
        )
        assert dead["step"] == rand["step"] == K
        assert dead["masked_fraction"] == rand["masked_fraction"] > 0
        # The dead mask is exactly the units the control's step-K batch left unused.
        sp = load_run(experiment / f"control-seed{seed}").sparsity
        at_k = sp[sp.step == K].set_index("name")
        differ = 0
        for name, layer in dead["layers"].items():
            other = rand["layers"][name]
            assert (layer["hidden"], layer["masked"]) == (other["hidden"], other["masked"])
            assert layer["masked"] == layer["hidden"] - at_k.loc[name, "per_batch"]
            assert len(layer["units"]) == len(set(layer["units"])) == layer["masked"]
            differ += set(layer["units"]) != set(other["units"])
        assert differ  # the random arm masks other units than the dead arm


def test_trained_models_carry_the_recorded_masks(experiment: Path) -> None:
    """The masks act in the models that were trained: their unit_mask buffers zero exactly the
    units mask.json names (and the control has none)."""
    for arm in ("control", "dead", "random"):
        run = experiment / f"{arm}-seed0"
        model, _ = load_trained_model(run)
        info = json.loads((run / "mask.json").read_text()) if arm != "control" else None
        for name, mlp in model.mlps().items():
            zeros = (mlp.unit_mask == 0).nonzero().flatten().tolist()
            assert zeros == (sorted(info["layers"][name]["units"]) if info else [])


def test_report_statistics_equal_scipy(experiment: Path) -> None:
    tests = pd.read_csv(experiment / "report/tables/mask_tests.csv", index_col=0)

    def final(arm: str, metric: str) -> list[float]:
        return [load_run(experiment / f"{arm}-seed{s}").eval[metric].iloc[-1] for s in (0, 1)]

    for metric in ("val_loss", "val_acc"):
        ref = stats.ttest_ind(final("random", metric), final("control", metric), equal_var=False)
        row = tests.loc[f"random − control: {metric}"]
        assert row["p"] == pytest.approx(ref.pvalue, rel=1e-8)
        assert row["t"] == pytest.approx(ref.statistic, rel=1e-8)
        diff = np.mean(final("random", metric)) - np.mean(final("control", metric))
        assert row["difference"] == pytest.approx(diff, rel=1e-8, abs=1e-12)
    claims = pd.read_csv(experiment / "report/tables/mask_claims.csv", index_col=0)
    assert {"mask_dead_equivalent", "mask_random_collapse"} <= set(
        claims.index.map({rule.claim: key for key, rule in RULES.items()}.get)
    )
    # Two seeds of 20 steps cannot show equivalence within the margins, nor a collapse.
    for verdict in claims["this experiment"]:
        assert verdict.split(":")[0] in {"inconclusive", "does not hold", "holds"}


def test_detectable_effect_matches_the_normal_approximation() -> None:
    # Large samples: d = (z_{1-α/2} + z_{power}) * sqrt(2 / n).
    n = 2000
    expected = (stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) * np.sqrt(2 / n)
    assert detectable_effect(n, n) == pytest.approx(expected, rel=2e-3)
    assert detectable_effect(3, 3) > 3  # three seeds: only huge differences show


def test_finished_experiment_is_not_retrained(experiment: Path, monkeypatch) -> None:
    monkeypatch.setattr(runs, "train", _no_training)
    index = mask.run_mask_experiment(seeds=2, prune=True, out=experiment, **ARGS)
    assert index == experiment / "report/index.html"
    with pytest.raises(UserError, match=r"another experiment \(differs in: seeds\)"):
        mask.run_mask_experiment(seeds=3, prune=True, out=experiment, **ARGS)
    prune.prune_run(experiment / "control-seed0", K, experiment / "pruned-seed0")


def test_interrupted_arm_resumes_to_the_same_run(experiment: Path, tmp_path: Path,
                                                 monkeypatch) -> None:  # fmt: skip
    original, calls = runmeta.Progress.update, {"n": 0}

    def killed_in_second_run(self, done: int, loss: float) -> None:
        original(self, done, loss)
        calls["n"] += done == 15
        if calls["n"] == 2:  # the control reached 15 first; the dead arm is killed there
            raise KeyboardInterrupt

    monkeypatch.setattr(runmeta.Progress, "update", killed_in_second_run)
    with pytest.raises(KeyboardInterrupt):
        mask.run_mask_experiment(seeds=1, prune=False, out=tmp_path, **ARGS)
    monkeypatch.setattr(runmeta.Progress, "update", original)
    assert runs.status(tmp_path / "dead-seed0", 20) == "partial"
    assert not (tmp_path / "random-seed0").exists()
    mask.run_mask_experiment(seeds=1, prune=False, out=tmp_path, **ARGS)
    for arm in ("control", "dead", "random"):
        pd.testing.assert_frame_equal(
            _train_rows(tmp_path / f"{arm}-seed0"), _train_rows(experiment / f"{arm}-seed0"),
            check_exact=True,
        )  # fmt: skip


def test_pruned_logits_equal_dead_masked_logits(experiment: Path) -> None:
    control = experiment / "control-seed0"
    plan = prune.plan_pruning(control, K)
    masked, cfg = load_trained_model(control, checkpoint_path(control, K))
    for name, mlp in masked.mlps().items():
        mlp.set_unit_mask(plan.keep[name].float())
    assert plan.widths == [int(k.sum()) for k in plan.keep.values()]
    assert sum(plan.widths) < 2 * 128
    x = torch.randint(0, cfg.model.vocab_size, (3, cfg.data.seq_len))
    with torch.no_grad():
        torch.testing.assert_close(plan.model.eval()(x).logits, masked(x).logits)


def test_pruned_training_follows_the_dead_masked_run(experiment: Path) -> None:
    for seed in (0, 1):
        dead = _train_rows(experiment / f"dead-seed{seed}")
        pruned = _train_rows(experiment / f"pruned-seed{seed}")
        assert np.abs(dead["loss"] - pruned["loss"]).loc[K:].max() < 1e-4
        info = json.loads((experiment / f"pruned-seed{seed}/prune.json").read_text())
        masked = json.loads((experiment / f"dead-seed{seed}/mask.json").read_text())
        assert info["widths"] == [v["hidden"] - v["masked"] for v in masked["layers"].values()]
        assert load_run(experiment / f"pruned-seed{seed}").meta["model"]["d_ff"] == info["widths"]
    # AdamW keeps moving the masked units (momentum, no gradient) yet they never reach the
    # output: the kept units' weights of both runs agree at the end.
    units = json.loads((experiment / "pruned-seed0/kept_units.json").read_text())
    at_k = load_file(checkpoint_path(experiment / "control-seed0", K) / "model.safetensors")
    dead = load_file(checkpoint_path(experiment / "dead-seed0", 20) / "model.safetensors")
    pruned = load_file(checkpoint_path(experiment / "pruned-seed0", 20) / "model.safetensors")
    for layer, name in enumerate(units):
        kept = torch.tensor(units[name])
        gone = torch.ones(128, dtype=torch.bool)
        gone[kept] = False
        w = f"blocks.{layer}.mlp.w_in.weight"
        assert not torch.equal(dead[w][gone], at_k[w][gone])
        assert torch.equal(
            dead[f"blocks.{layer}.mlp.unit_mask"][gone], torch.zeros(int(gone.sum()))
        )
        torch.testing.assert_close(pruned[w], dead[w][kept], atol=1e-5, rtol=1e-4)
        wo = f"blocks.{layer}.mlp.w_out.weight"
        torch.testing.assert_close(pruned[wo], dead[wo][:, kept], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("activation", ["relu", "reglu"])
def test_prune_model_equals_masking_gated_and_empty_layers(activation: str) -> None:
    cfg = load_config("tiny", ["--model.activation", activation, "--model.n_layers", "3"])
    cfg.model = cfg.model.with_data(64, 16)
    torch.manual_seed(0)
    model = Transformer(cfg.model).eval()
    for p in model.parameters():  # non-zero biases, so that a removed bias would show
        p.data.add_(0.1 * torch.randn_like(p))
    keep = {name: torch.rand(128) < 0.6 for name in model.mlps()}
    keep["blocks.2.mlp.hidden"][:] = False  # no unit used: one masked unit is kept
    pruned = prune.prune_model(model, cfg, keep)
    assert pruned.cfg.widths == [int(keep["blocks.0.mlp.hidden"].sum()),
                                 int(keep["blocks.1.mlp.hidden"].sum()), 1]  # fmt: skip
    for name, mlp in model.mlps().items():
        mlp.set_unit_mask(keep[name].float())
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(pruned(x).logits, model(x).logits)


def test_optimizer_and_tracker_slicing_by_hand() -> None:
    cfg = load_config("tiny", ["--model.activation", "reglu"])  # gated: w_in is [gate; up]
    cfg.model = cfg.model.with_data(64, 16)
    model = Transformer(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n]
    opt.step()
    keep = {name: torch.zeros(128, dtype=torch.bool) for name in model.mlps()}
    keep["blocks.0.mlp.hidden"][[1, 5]] = True
    keep["blocks.1.mlp.hidden"][[0, 3]] = True
    index = prune.unit_index(model, keep)
    sliced = prune.slice_optimizer_state(full_optimizer_state(model, opt), index)["state"]
    # After one step from zero, exp_avg = (1 - beta1) g and exp_avg_sq = (1 - beta2) g^2.
    hand = {
        "blocks.0.mlp.w_in.weight": grads["blocks.0.mlp.w_in.weight"][[1, 5, 129, 133]],
        "blocks.0.mlp.w_in.bias": grads["blocks.0.mlp.w_in.bias"][[1, 5, 129, 133]],
        "blocks.0.mlp.w_out.weight": grads["blocks.0.mlp.w_out.weight"][:, [1, 5]],
        "blocks.1.mlp.w_in.weight": grads["blocks.1.mlp.w_in.weight"][[0, 3, 128, 131]],
        "blocks.1.mlp.w_out.weight": grads["blocks.1.mlp.w_out.weight"][:, [0, 3]],
        "blocks.1.mlp.w_out.bias": grads["blocks.1.mlp.w_out.bias"],  # per d_model: untouched
        "blocks.0.attn.qkv.weight": grads["blocks.0.attn.qkv.weight"],
    }
    for name, g in hand.items():
        torch.testing.assert_close(sliced[name]["exp_avg"], 0.1 * g)
        torch.testing.assert_close(sliced[name]["exp_avg_sq"], 0.05 * g * g)
        assert float(sliced[name]["step"]) == 1.0
    tracker = LifecycleTracker()
    used = {name: torch.arange(128) % 3 == 0 for name in keep}
    tracker.update(0, used)
    tracker.update(7, {name: torch.arange(128) % 2 == 0 for name in keep})
    state = prune.slice_tracker_state(tracker.state_dict(), index)
    layer = state["blocks.0.mlp.hidden"]
    assert layer["first_used"].tolist() == [False, False]  # units 1 and 5: 1 % 3, 5 % 3 != 0
    assert layer["latest_used"].tolist() == [False, False]
    assert layer["last_step_used"].tolist() == [-1, -1]
    other = state["blocks.1.mlp.hidden"]  # units 0 (used at steps 0 and 7) and 3 (at step 0)
    assert other["first_used"].tolist() == [True, True]
    assert other["latest_used"].tolist() == [True, False]
    assert other["last_step_used"].tolist() == [7, 0]
    assert (
        layer["transitions"].tolist()
        == tracker.state_dict()["blocks.0.mlp.hidden"]["transitions"].tolist()
    )  # the history of whole-layer counts is kept as measured


def test_prune_errors(experiment: Path, tmp_path: Path) -> None:
    control = experiment / "control-seed0"
    with pytest.raises(UserError, match=r"no checkpoint at step 7 \(checkpoints at: 10, 20\)"):
        prune.prune_run(control, 7, tmp_path / "p")
    with pytest.raises(UserError, match="must exceed the pruning step"):
        prune.prune_run(control, K, tmp_path / "p", steps=K)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a pruned run"):
        prune.prune_run(control, K, tmp_path / "busy")
    with pytest.raises(UserError, match=r"holds a pruning of .* at step 10"):
        prune.prune_run(control, K, experiment / "pruned-seed0", steps=30)
    with pytest.raises(UserError, match="not a run directory"):
        prune.prune_run(tmp_path / "busy", K, tmp_path / "p")


def test_mask_experiment_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"--at must lie in \[1, 19\]"):
        mask.run_mask_experiment("tiny", 20, 1, False, False, tmp_path / "a", None)
    with pytest.raises(UserError, match="--seeds must be at least 1"):
        mask.run_mask_experiment("tiny", K, 0, False, False, tmp_path / "a", None)
    (tmp_path / "b").mkdir()
    (tmp_path / "b/x").write_text("")
    with pytest.raises(UserError, match="not an experiment directory"):
        mask.run_mask_experiment("tiny", K, 1, False, False, tmp_path / "b", None)
