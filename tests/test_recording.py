"""The Recorder in other people's training loops: a plain loop, a Hugging Face Trainer (real),
and their run directories against ``trace()`` on the same batches with the same weights."""

from __future__ import annotations

import copy
import gc
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

import sparsetrace
from sparsetrace.errors import UserError
from sparsetrace.integrations.huggingface import STATE_FILE, attach
from sparsetrace.recording import Recorder
from sparsetrace.report import write_report
from sparsetrace.rundir import load_run
from torchrun import torchrun

SEQ, VOCAB = 16, 64
METRICS = ["per_token", "per_sequence", "per_batch", "p50", "p65", "p75", "p90"]


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_inner=64, vocab_size=VOCAB,
                     n_positions=SEQ, activation_function="relu", resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return GPT2LMHeadModel(cfg)


class Tokens(torch.utils.data.Dataset):
    """Fixed random token windows (local data, no download)."""

    def __init__(self, n: int = 96, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Snapshots(TrainerCallback):
    """For every measured step: the weights and the first micro-batch's inputs it saw."""

    def __init__(self, every: int) -> None:
        self.every, self.taken, self._armed = every, {}, None

    def on_train_begin(self, args, state, control, model=None, **kwargs) -> None:
        model.register_forward_pre_hook(self._capture, with_kwargs=True)
        self.model = model

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        if state.global_step % self.every == 0:
            self._armed = state.global_step

    def _capture(self, module, args, kwargs) -> None:
        if self._armed is not None and module.training:
            weights = copy.deepcopy(module.state_dict())
            self.taken[self._armed] = (weights, kwargs["input_ids"].clone())
            self._armed = None


def _trainer(
    out: Path, model, steps: int, callbacks=(), save_steps: int = 0, warmup: float = 2
) -> Trainer:
    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, learning_rate=3e-3, warmup_steps=warmup, logging_steps=4,
        save_steps=save_steps or 10_000, save_strategy="steps" if save_steps else "no",
        report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
        dataloader_num_workers=0,
    )  # fmt: skip
    return Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=list(callbacks))


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory) -> tuple[Path, Snapshots]:
    out = tmp_path_factory.mktemp("hf")
    snaps = Snapshots(every=5)
    trainer = _trainer(out, tiny_gpt2(), 20, [snaps])
    attach(trainer, every=5)
    trainer.train()
    return out / "sparsetrace", snaps


def assert_rows_equal_trace(rows: pd.DataFrame, taken: dict) -> None:
    """Each measured step's rows equal trace() of a fresh model with that step's weights on the
    batch it was fed."""
    assert sorted(rows["step"].unique()) == sorted(taken)
    for step, (weights, ids) in taken.items():
        model = tiny_gpt2()
        model.load_state_dict(weights)
        with sparsetrace.trace(model) as t:
            model(input_ids=ids)
        expected = t.summary().set_index("layer")
        got = rows[rows["step"] == step].set_index("layer")
        for col in METRICS:
            assert got[col].to_numpy() == pytest.approx(expected[col].to_numpy(), rel=1e-6), col


def test_hf_trainer_rows_equal_trace_on_the_same_batch_and_weights(hf_run) -> None:
    run_dir, snaps = hf_run
    assert sorted(snaps.taken) == [0, 5, 10, 15]
    assert_rows_equal_trace(load_run(run_dir).sparsity, snaps.taken)


def test_hf_run_directory_makes_a_report(hf_run, tmp_path: Path) -> None:
    run_dir, _ = hf_run
    run = load_run(run_dir)
    assert run.meta["status"] == "finished" and run.meta["train"]["warmup_steps"] == 2
    assert len(run.lifecycle["layers"]) == 2 and not run.train.empty
    # train.csv holds the Trainer's logged loss at the step just done
    assert run.train["step"].tolist() == [3, 7, 11, 15, 19]
    index = write_report([run_dir], tmp_path / "report")
    html = index.read_text()
    assert "Table 1" in html and "Findings" in html
    assert (tmp_path / "report" / "figures").is_dir()
    # Table 1 holds the device-scope use of the last measured step, in %, read back from the CSV
    table = pd.read_csv(tmp_path / "report" / "tables" / "table1.csv", index_col="layer")
    [column] = [c for c in table.columns if c.endswith(": per-token (%)") and "paper" not in c]
    device = run.sparsity[run.sparsity["scope"] == "device"]
    end = device[device["step"] == device["step"].max()].set_index("layer")
    assert table.loc[end.index, column].tolist() == pytest.approx(
        (100 * end["per_token_frac"]).tolist()
    )


def test_hf_resume_continues_the_lifecycle_exactly(tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    first = _trainer(straight, tiny_gpt2(), 20)
    attach(first, every=5)
    first.train()
    split = tmp_path / "split"
    part = _trainer(split, tiny_gpt2(), 20, save_steps=10)
    attach(part, every=5)

    class StopAt12(TrainerCallback):  # past the checkpoint: step 10's rows are already written
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= 12

    part.add_callback(StopAt12())
    part.train()
    assert (split / "checkpoint-10" / STATE_FILE).is_file()
    assert 10 in load_run(split / "sparsetrace").sparsity["step"].tolist()  # to be dropped
    rest = _trainer(split, tiny_gpt2(), 20, save_steps=10)
    attach(rest, every=5)
    rest.train(resume_from_checkpoint=str(split / "checkpoint-10"))
    a, b = load_run(straight / "sparsetrace"), load_run(split / "sparsetrace")
    cols = ["step", "layer", *METRICS]
    pd.testing.assert_frame_equal(a.sparsity[cols], b.sparsity[cols])
    assert a.lifecycle == b.lifecycle


# --------------------------------------------------------------------------------------------------
# A plain loop


def test_plain_loop_measures_first_micro_batch_and_every_n(tmp_path: Path) -> None:
    model = tiny_gpt2()
    ids = Tokens(n=32).ids
    seen = []
    with Recorder(model, tmp_path / "run", every=3, tensorboard=False) as rec:
        for step in range(7):
            with rec.step(step):
                for micro in range(2):  # gradient accumulation: micro-batch 0 is measured
                    batch = ids[(step * 2 + micro) % 8 * 4 :][:4]
                    if micro == 0 and rec.measures(step):
                        seen.append((step, copy.deepcopy(model.state_dict()), batch))
                    model(input_ids=batch, labels=batch).loss.backward()
            rec.log(step, loss=1.0)
    rows = load_run(tmp_path / "run").sparsity
    assert sorted(rows["step"].unique()) == [0, 3, 6]
    for step, weights, batch in seen:
        m = tiny_gpt2()
        m.load_state_dict(weights)
        with sparsetrace.trace(m) as t:
            m(input_ids=batch)
        got = rows[rows["step"] == step].set_index("layer")["per_batch"]
        assert got.tolist() == t.summary().set_index("layer")["per_batch"].tolist()
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["status"] == "finished" and meta["model"]["d_ff"] == [64, 64]


def test_unmeasured_steps_do_no_tensor_work(tmp_path: Path, monkeypatch) -> None:
    """On a step that is not due the hooks return at once: use_counts is never called."""
    model = tiny_gpt2()
    calls = []
    import sparsetrace.recording as recording

    real = recording.use_counts
    monkeypatch.setattr(recording, "use_counts", lambda *a, **k: calls.append(1) or real(*a, **k))
    rec = Recorder(model, tmp_path / "r", every=10, tensorboard=False)
    ids = Tokens(n=4).ids
    for step in range(1, 10):
        with rec.step(step):
            model(input_ids=ids)
    assert calls == []
    with rec.step(10):
        model(input_ids=ids)
    assert len(calls) == 2  # two layers, once
    rec.close()


def test_recorder_bad_input(tmp_path: Path) -> None:
    model = tiny_gpt2()
    with pytest.raises(UserError, match="every must be a positive"):
        Recorder(model, tmp_path / "a", every=0)
    Recorder(model, tmp_path / "b", every=1, tensorboard=False).close()
    with pytest.raises(UserError, match="already holds a run"):
        Recorder(model, tmp_path / "b", every=1)
    with pytest.raises(UserError, match="compiled"):
        Recorder(torch.compile(model), tmp_path / "c")
    in_place = tiny_gpt2()
    in_place.compile()  # nn.Module.compile: no _orig_mod, a compiled call instead
    with pytest.raises(UserError, match="compiled"):
        Recorder(in_place, tmp_path / "c2")
    with pytest.raises(UserError, match=r"module paths|modules"):
        Recorder(torch.nn.Sequential(torch.nn.Linear(4, 4)), tmp_path / "d")
    rec = Recorder(model, tmp_path / "e", every=1, tensorboard=False)
    other = rec.state_dict()
    other["layers"] = ["blocks.0.mlp.hidden"]
    with pytest.raises(UserError, match="architecture changed"):
        rec.load_state_dict(other, 0)
    with pytest.raises(UserError, match=r"inside Recorder\.step"), rec.step(0):
        pass  # no forward pass
    rec.close()


# --------------------------------------------------------------------------------------------------
# Lightning


class LitGPT2:
    """A LightningModule holding a tiny GPT-2 (built lazily: lightning is an optional extra)."""

    @staticmethod
    def make(seed: int = 0):
        import lightning.pytorch as pl

        class Lit(pl.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.model = tiny_gpt2(seed)

            def training_step(self, batch, batch_idx):
                return self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss

            def validation_step(self, batch, batch_idx):
                loss = self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
                self.log("val_loss", loss)

            def configure_optimizers(self):
                return torch.optim.AdamW(self.parameters(), lr=3e-3)

        return Lit()


def _lightning_fit(root: Path, steps: int, callbacks, ckpt_path=None, val: bool = False):
    import lightning.pytorch as pl

    saves = any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks)
    trainer = pl.Trainer(
        default_root_dir=str(root), max_steps=steps, accumulate_grad_batches=2,
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=saves, num_sanity_val_steps=0,
        val_check_interval=10 if val else None, limit_val_batches=2 if val else 0,
        log_every_n_steps=4, deterministic=True, callbacks=list(callbacks),
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(Tokens(), batch_size=4, shuffle=False)
    module = LitGPT2.make()
    trainer.fit(module, loader, loader if val else None, ckpt_path=ckpt_path)
    return trainer


class LitSnapshots:
    """For every measured step: the weights and the first micro-batch Lightning fed it."""

    @staticmethod
    def make(every: int):
        import lightning.pytorch as pl

        class Snap(pl.Callback):
            def __init__(self) -> None:
                self.taken, self._step, self.losses = {}, None, {}

            def on_train_start(self, trainer, pl_module) -> None:
                def record(module, args, kwargs, output):  # every training forward's loss
                    if module.training:
                        self.losses.setdefault(trainer.global_step, []).append(float(output.loss))

                pl_module.model.register_forward_hook(record, with_kwargs=True)

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                step = trainer.global_step
                if step != self._step and step % every == 0:
                    weights = copy.deepcopy(pl_module.model.state_dict())
                    self.taken[step] = (weights, batch["input_ids"].clone())
                self._step = step

        return Snap()


def test_lightning_rows_equal_trace_and_make_a_report(tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    from sparsetrace.integrations.lightning import SparsityCallback

    snaps = LitSnapshots.make(5)
    _lightning_fit(tmp_path, 20, [snaps, SparsityCallback(every=5, warmup_steps=2)], val=True)
    run_dir = tmp_path / "sparsetrace"
    run = load_run(run_dir)
    assert sorted(snaps.taken) == [0, 5, 10, 15]
    assert_rows_equal_trace(run.sparsity, snaps.taken)
    assert run.meta["status"] == "finished" and run.meta["train"]["warmup_steps"] == 2
    assert run.train["step"].tolist() == [3, 7, 11, 15, 19]  # the step just done, every 4
    # the step's mean micro-batch loss (Lightning hands over each divided by the accumulation)
    losses = snaps.losses
    for step, loss in zip(run.train["step"], run.train["loss"], strict=True):
        assert loss == pytest.approx(sum(losses[step]) / len(losses[step]), rel=1e-5)
    # val_check_interval=10 counts micro-batches: after batches 10 and 20 of epoch 1 (12 steps,
    # 24 batches), then batch 10 of epoch 2; eval.csv's step is the updates done
    assert run.eval["step"].tolist() == [5, 10, 17] and run.eval["val_loss"].notna().all()
    index = write_report([run_dir], tmp_path / "report")
    assert "Table 1" in index.read_text()


def test_lightning_resume_continues_the_lifecycle_exactly(tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    import lightning.pytorch as pl

    from sparsetrace.integrations.lightning import SparsityCallback

    # 12 optimizer steps are one epoch: the split is at an epoch boundary, where Lightning
    # resumes the data exactly (mid-epoch it cannot for a plain DataLoader).
    _lightning_fit(tmp_path / "straight", 24, [SparsityCallback(every=4)])
    saver = pl.callbacks.ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=12, save_top_k=-1)
    # stopped at 16, past the checkpoint at 12: the rows of steps 12 (measured again) are dropped
    _lightning_fit(tmp_path / "split", 16, [SparsityCallback(every=4), saver])
    assert 12 in load_run(tmp_path / "split" / "sparsetrace").sparsity["step"].tolist()
    (ckpt,) = (tmp_path / "ckpt").glob("*step=12.ckpt")
    saved = torch.load(ckpt, weights_only=False)["callbacks"]
    assert any("recorder" in v for k, v in saved.items() if "SparsityCallback" in k)
    _lightning_fit(tmp_path / "split", 24, [SparsityCallback(every=4)], ckpt_path=str(ckpt))
    a = load_run(tmp_path / "straight" / "sparsetrace")
    b = load_run(tmp_path / "split" / "sparsetrace")
    cols = ["step", "layer", *METRICS]
    assert sorted(b.sparsity["step"].unique()) == [0, 4, 8, 12, 16, 20]
    pd.testing.assert_frame_equal(a.sparsity[cols], b.sparsity[cols])
    assert a.lifecycle == b.lifecycle


# --------------------------------------------------------------------------------------------------
# torchrun


@pytest.mark.slow
def test_two_process_global_rows_equal_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    script = Path(__file__).with_name("recorder_loop.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), str(tmp_path / "one")], check=True, env=env,
                   timeout=240)  # fmt: skip
    torchrun(str(script), str(tmp_path / "two"))
    one, both = load_run(tmp_path / "one").sparsity, load_run(tmp_path / "two").sparsity
    assert set(both.scope) == {"device", "global", "device_min", "device_max"}
    glob = both[both.scope == "global"].reset_index(drop=True)
    dev = one[one.scope == "device"].reset_index(drop=True)
    assert glob.step.tolist() == dev.step.tolist() == [0, 0, 2, 2, 4, 4]
    assert glob.tokens.tolist() == dev.tokens.tolist()
    np.testing.assert_allclose(glob[METRICS], dev[METRICS], rtol=1e-4, atol=1e-6)
    # rank 0's own rows are its half only: per-batch use below the union's somewhere
    half = both[both.scope == "device"].reset_index(drop=True)
    assert (half.per_batch <= glob.per_batch).all() and (half.per_batch < glob.per_batch).any()


def test_a_closed_recorder_does_not_keep_the_model_alive(tmp_path: Path) -> None:
    # Under DDP the wrapper must die before the process group (its Reducer must not be the group's
    # last owner: scripts/gloo_teardown.py); a Recorder holding the model would keep it alive.
    model = tiny_gpt2()
    rec = Recorder(model, tmp_path / "r", every=1, tensorboard=False)
    with rec.step(0):
        model(input_ids=Tokens(n=2).ids)
    rec.close()
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None
    assert load_run(tmp_path / "r").meta["model"]["class"] == "GPT2LMHeadModel"


def test_hf_warmup_given_as_a_ratio(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, tiny_gpt2(), 4, warmup=0.5)  # transformers 5: a ratio
    attach(trainer, every=2)
    trainer.train()
    assert load_run(tmp_path / "sparsetrace").meta["train"]["warmup_steps"] == 2


def test_a_failing_forward_raises_its_own_error_and_the_next_step_measures(tmp_path: Path) -> None:
    model = tiny_gpt2()
    ids = Tokens(n=4).ids
    rec = Recorder(model, tmp_path / "r", every=1, tensorboard=False)
    with pytest.raises(RuntimeError, match="out of memory"), rec.step(0):
        raise RuntimeError("out of memory")
    with rec.step(1):
        model(input_ids=ids)
    rec.close()
    assert sorted(load_run(tmp_path / "r").sparsity["step"].unique()) == [1]


def test_wrapper_varargs_still_give_the_batch_shape_and_mask() -> None:
    """DDP's forward(*inputs, **kwargs): the mask inside **kwargs is found."""
    import inspect

    from sparsetrace.analysis.tracer import forward_inputs

    def forward(*inputs, **kwargs):
        return None

    ids, mask = torch.zeros(3, 5, dtype=torch.long), torch.ones(3, 5)
    kwargs = {"input_ids": ids, "attention_mask": mask}
    shape, found = forward_inputs(inspect.signature(forward), (), kwargs)
    assert shape == (3, 5) and found is mask
    shape, found = forward_inputs(inspect.signature(forward), (ids,), {})
    assert shape == (3, 5) and found is None
