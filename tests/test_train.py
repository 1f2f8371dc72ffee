"""Training: schedule, resume == straight run, bad input (NaN, full disk, foreign checkpoints)."""

from __future__ import annotations

import errno
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from sparsetrace import checkpoint
from sparsetrace.config import load_config
from sparsetrace.errors import UserError
from sparsetrace.rundir import load_run
from sparsetrace.train import loop, runmeta
from sparsetrace.train.loop import TrainingDiverged, lr_at, train


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch) -> None:
    monkeypatch.setenv("SPARSETRACE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def tiny(tmp_path: Path, name: str = "r", *extra: str):
    return load_config("tiny", ["--out_dir", str(tmp_path), "--run_name", name, *extra])


def test_lr_schedule_hand_computed() -> None:
    cfg = load_config("tiny", ["--train.lr", "1.0", "--train.warmup_steps", "4",
                               "--train.steps", "14", "--train.min_lr_ratio", "0.1"])  # fmt: skip
    assert [lr_at(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cfg) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_at(9, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: cos(pi/2) = 0
    assert lr_at(14, cfg) == pytest.approx(0.1)


def _frames(run_dir: Path) -> dict[str, pd.DataFrame]:
    run = load_run(run_dir)
    return {"train": run.train.drop(columns="step_time_s"), "eval": run.eval,
            "sparsity": run.sparsity}  # fmt: skip


def test_run_directory_contents(tmp_path: Path) -> None:
    run_dir = train(tiny(tmp_path))
    run = load_run(run_dir)
    assert run.missing == []
    assert run.meta["status"] == "finished" and run.meta["step"] == 20
    assert run.meta["data"]["corpus"]["name"]
    # Measured at step 0, every 5 steps and at the last step, for both layers.
    assert sorted(run.sparsity.step.unique()) == [0, 5, 10, 15, 19]
    assert sorted(run.sparsity.layer.unique()) == [0, 1]
    assert list(run.train.step) == list(range(20))
    assert list(run.eval.step) == [10, 20]
    s = run.sparsity
    assert ((s.per_token <= s.per_sequence) & (s.per_sequence <= s.per_batch)).all()
    assert (s.per_batch_frac == s.per_batch / s.hidden).all()
    assert set(run.lifecycle["layers"]) == {"0", "1"}
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == [
        "step_0000010",
        "step_0000020",
    ]


def train_killed_at(cfg, done_at: int, monkeypatch) -> None:
    """Train ``cfg`` and interrupt it (KeyboardInterrupt, as a kill) once ``done_at`` steps are
    reported done; the trainer's hooks are restored afterwards."""
    original = runmeta.Progress.update

    def killed(self, done: int, loss: float) -> None:
        original(self, done, loss)
        if done == done_at:
            raise KeyboardInterrupt

    monkeypatch.setattr(runmeta.Progress, "update", killed)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(runmeta.Progress, "update", original)


def test_resume_after_kill_equals_straight_run(tmp_path: Path, monkeypatch) -> None:
    straight = train(tiny(tmp_path, "straight"))
    # after the step-10 checkpoint: rows 11-13 must be dropped on resume
    train_killed_at(tiny(tmp_path, "resumed"), 13, monkeypatch)
    interrupted = load_run(tmp_path / "resumed")
    assert interrupted.meta["status"] == "interrupted"
    assert interrupted.train.step.max() == 12
    resumed = train(tiny(tmp_path, "resumed"), resume=True)

    a, b = _frames(straight), _frames(resumed)
    for key in a:
        pd.testing.assert_frame_equal(a[key], b[key], check_exact=True, obj=key)
    wa = load_file(straight / "checkpoints/step_0000020/model.safetensors")
    wb = load_file(resumed / "checkpoints/step_0000020/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    la, lb = (json.loads((d / "lifecycle.json").read_text()) for d in (straight, resumed))
    assert la == lb


def test_existing_run_needs_resume_and_resume_needs_checkpoint(tmp_path: Path) -> None:
    train(tiny(tmp_path))
    with pytest.raises(UserError, match="pass --resume"):
        train(tiny(tmp_path))
    with pytest.raises(UserError, match="no checkpoint to resume from"):
        train(tiny(tmp_path, "fresh"), resume=True)


def test_checkpoint_from_another_config_is_refused(tmp_path: Path) -> None:
    train(tiny(tmp_path))
    with pytest.raises(UserError, match=r"another model config \(differs in: d_ff, widths\)"):
        train(tiny(tmp_path, "r", "--model.d_ff", "64"), resume=True)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    run_dir = train(tiny(tmp_path))
    weights = run_dir / "checkpoints/step_0000020/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserError, match="corrupt"):
        train(tiny(tmp_path), resume=True)
    (run_dir / "checkpoints/step_0000020/state.pt").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="corrupt"):
        train(tiny(tmp_path), resume=True)


def poison_after(monkeypatch, n_steps: int):
    """From the training forward after ``n_steps`` on, the loss is NaN; returns the real forward."""
    calls = {"n": 0}
    forward = loop.Transformer.forward

    def poisoned(self, idx, targets=None, measure=False):
        out = forward(self, idx, targets, measure)
        if self.training:
            calls["n"] += 1
            if calls["n"] > n_steps:
                out.loss = out.loss * math.nan
        return out

    monkeypatch.setattr(loop.Transformer, "forward", poisoned)
    return forward


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path, monkeypatch) -> None:
    forward = poison_after(monkeypatch, 12)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 12.*step_0000010"):
        train(tiny(tmp_path))
    run = load_run(tmp_path / "r")
    assert run.meta["status"] == "failed"
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "r")] == ["step_0000010"]
    monkeypatch.setattr(loop.Transformer, "forward", forward)
    train(tiny(tmp_path), resume=True)  # the kept checkpoint is valid and resumable


def test_disk_full_while_checkpointing_keeps_previous(tmp_path: Path, monkeypatch) -> None:
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if "step_0000020" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(UserError, match=r"No space left on device.*step_0000010"):
        train(tiny(tmp_path))
    ckpt_root = tmp_path / "r" / "checkpoints"
    assert sorted(p.name for p in ckpt_root.iterdir()) == ["step_0000010"]  # no half-written dir
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert train(tiny(tmp_path), resume=True) == tmp_path / "r"


def test_dead_and_random_unit_masks(tmp_path: Path) -> None:
    dead = train(tiny(tmp_path, "dead", "--mask.at_step", "5", "--mask.kind", "dead"))
    rand = train(tiny(tmp_path, "rand", "--mask.at_step", "5", "--mask.kind", "random"))
    info_d, info_r = (json.loads((d / "mask.json").read_text()) for d in (dead, rand))
    sp = load_run(dead).sparsity
    for name, layer in info_d["layers"].items():
        at5 = sp[(sp.step == 5) & (sp.name == name)].iloc[0]
        # The dead mask removes exactly the units unused in step 5's batch...
        assert layer["masked"] == layer["hidden"] - at5.per_batch
        # ...the random mask the same number per layer (identical training up to step 5).
        assert info_r["layers"][name]["masked"] == layer["masked"]
        # After the mask, no masked unit is used again: per-batch use never exceeds the kept ones.
        later = sp[(sp.step > 5) & (sp.name == name)]
        assert (later.per_batch <= layer["hidden"] - layer["masked"]).all()
    expected = sum(v["masked"] for v in info_d["layers"].values()) / sum(
        v["hidden"] for v in info_d["layers"].values()
    )
    assert info_d["masked_fraction"] == pytest.approx(expected)
    # The random mask hides other units than the dead one, including units in use at step 5.
    assert any(set(info_r["layers"][n]["units"]) != set(v["units"])
               for n, v in info_d["layers"].items())  # fmt: skip
    for run, info in ((dead, info_d), (rand, info_r)):
        _assert_masked_units_stay_off(run, info, 5)


def _assert_masked_units_stay_off(run: Path, info: dict, step: int) -> None:
    """The masks act on the model: the trained model's unit_mask zeros exactly the recorded
    units, and none of them is used in any batch measured after ``step``."""
    model, _ = checkpoint.load_trained_model(run)
    lifecycle = load_run(run).lifecycle["layers"]
    for i, (name, mlp) in enumerate(model.mlps().items()):
        units = sorted(info["layers"][name]["units"])
        assert (mlp.unit_mask == 0).nonzero().flatten().tolist() == units
        last_used = torch.tensor(lifecycle[str(i)]["last_step_used"])
        assert (last_used[units] <= step).all()


def test_masks_survive_resume(tmp_path: Path, monkeypatch) -> None:
    straight = train(tiny(tmp_path, "a", "--mask.at_step", "5", "--mask.kind", "random"))
    train_killed_at(tiny(tmp_path, "b", "--mask.at_step", "5", "--mask.kind", "random"), 12,
                    monkeypatch)  # fmt: skip
    resumed = train(
        tiny(tmp_path, "b", "--mask.at_step", "5", "--mask.kind", "random"), resume=True
    )
    a, b = _frames(straight), _frames(resumed)
    for key in a:
        pd.testing.assert_frame_equal(a[key], b[key], check_exact=True, obj=key)
    # The resumed model still masks (its checkpoint restored the mask, not only the logs).
    info = json.loads((resumed / "mask.json").read_text())
    assert info["masked_fraction"] > 0
    _assert_masked_units_stay_off(resumed, info, 5)


def test_mlp_lr_mult_scales_only_the_mlp_updates(tmp_path: Path) -> None:
    """AdamW's first update is lr * m / sqrt(v) (~ ±lr) plus lr * wd * p: with the MLP matrices'
    LR tripled, their first step moves them exactly three times as far; nothing else changes."""
    deltas = {}
    for mult in ("1", "3"):
        cfg = tiny(tmp_path, f"m{mult}", "--train.mlp_lr_mult", mult, "--train.warmup_steps", "1")
        session = loop.setup(cfg)
        before = {n: p.detach().clone() for n, p in session.model.named_parameters()}
        loop._train_step(session, 0, measure=False)
        deltas[mult] = {n: p.detach() - before[n] for n, p in session.model.named_parameters()}
    for name, d1 in deltas["1"].items():
        d3 = deltas["3"][name]
        if ".mlp.w_" in name and name.endswith("weight"):
            assert torch.allclose(d3, 3 * d1, rtol=1e-4, atol=1e-9), name
        else:
            assert torch.allclose(d3, d1, rtol=1e-5, atol=1e-9), name


def test_reading_the_loss_every_n_steps_records_what_every_step_does(tmp_path: Path) -> None:
    """train.log_every only changes when the host reads the device: every row, every sparsity
    measurement and the lifecycle are those of the run that reads each step."""
    every_step = train(tiny(tmp_path, "each"))
    batched = train(tiny(tmp_path, "batched", "--train.log_every", "7"))
    a, b = _frames(every_step), _frames(batched)
    for key in a:
        pd.testing.assert_frame_equal(a[key], b[key], check_exact=True, obj=key)
    assert load_run(every_step).lifecycle == load_run(batched).lifecycle
    # The steps' time is shared out per read: within a read of 7 steps all rows are equal.
    times = load_run(batched).train.step_time_s.to_numpy()
    assert (times[:7] == times[0]).all() and times[0] > 0


def test_a_nan_found_at_a_later_read_names_its_step_and_keeps_the_checkpoint_before(
    tmp_path: Path, monkeypatch
) -> None:
    """Reading every 4 steps, the NaN of step 12 is found at the read after step 15: the error
    still names step 12, and no checkpoint holds weights trained on it."""
    poison_after(monkeypatch, 12)
    cfg = tiny(tmp_path, "r", "--train.log_every", "4", "--checkpoint.every", "16")
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 12.*no checkpoint"):
        train(cfg)
    run = load_run(tmp_path / "r")
    assert list(run.train.step) == list(range(12))  # rows up to the last finite loss
    assert checkpoint.list_checkpoints(tmp_path / "r") == []


def test_background_checkpoint_writer_writes_what_the_foreground_one_does(tmp_path: Path) -> None:
    weights = {"w": torch.arange(6.0).reshape(2, 3)}
    state = {"step": 3, "note": "x"}
    writer = checkpoint.CheckpointWriter(background=True)
    assert writer.background
    writer.save(tmp_path / "bg", 3, weights, state)
    writer.save(tmp_path / "bg", 4, weights, state, keep=1)  # waits for step 3 first
    writer.wait()
    checkpoint.CheckpointWriter().save(tmp_path / "fg", 4, weights, state)
    bg, fg = (
        checkpoint.list_checkpoints(tmp_path / "bg"),
        checkpoint.list_checkpoints(tmp_path / "fg"),
    )
    assert [p.name for p in bg] == ["step_0000004"]  # keep=1 applied after the second write
    for name in ("model.safetensors", "state.pt"):
        assert (bg[0] / name).read_bytes() == (fg[0] / name).read_bytes()
    # A failed write surfaces at the next wait, as the foreground writer's error would.
    (tmp_path / "file").write_text("not a directory")
    writer.save(tmp_path / "file", 5, weights, state)
    with pytest.raises(UserError, match="could not write checkpoint"):
        writer.wait()
    writer.close()


def test_checkpoint_every_zero_writes_none(tmp_path: Path) -> None:
    run_dir = train(tiny(tmp_path, "r", "--checkpoint.every", "0", "--train.log_every", "7"))
    run = load_run(run_dir)
    assert run.meta["status"] == "finished"
    assert list(run.train.step) == list(range(20))  # the last read comes at the end
    assert sorted(run.sparsity.step.unique()) == [0, 5, 10, 15, 19] and run.lifecycle["layers"]
    assert checkpoint.list_checkpoints(run_dir) == []
    with pytest.raises(UserError, match=r"checkpoint\.every must be >= 0"):
        tiny(tmp_path, "r", "--checkpoint.every", "-1")


def test_a_run_is_measured_on_its_training_device_or_the_cpu(monkeypatch) -> None:
    from sparsetrace.device import evaluation_device

    for has_gpu in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda has_gpu=has_gpu: has_gpu)
        assert evaluation_device("cpu").type == "cpu"  # a CPU run stays on the CPU, GPU or not
        for trained_on in ("cuda", "cuda:1", "auto"):
            assert evaluation_device(trained_on).type == ("cuda" if has_gpu else "cpu")


def test_a_checkpoint_between_reads_holds_every_step_before_it(tmp_path: Path, monkeypatch) -> None:
    """Reading every 7 steps with a checkpoint every 6: the checkpoint after step 11 must hold
    the tracker updated by step 10's measurement, unread until then. Killed at the read after
    step 13 and resumed from that checkpoint, the run equals the straight one."""
    extra = ("--train.log_every", "7", "--checkpoint.every", "6")
    straight = train(tiny(tmp_path, "straight", *extra))
    train_killed_at(tiny(tmp_path, "resumed", *extra), 14, monkeypatch)
    assert checkpoint.list_checkpoints(tmp_path / "resumed")[-1].name == "step_0000012"
    resumed = train(tiny(tmp_path, "resumed", *extra), resume=True)
    a, b = _frames(straight), _frames(resumed)
    for key in a:
        pd.testing.assert_frame_equal(a[key], b[key], check_exact=True, obj=key)
    assert load_run(straight).lifecycle == load_run(resumed).lifecycle
