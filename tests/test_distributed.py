"""Multi-process training on CPU (gloo, 2 processes via torchrun) against 1-process references.

A 2-process run with device batch B sees the same global batch as a 1-process run with batch 2B
(or batch B with 2 accumulation steps), so losses must agree to float tolerance, and its
``global`` sparsity rows must equal the 1-process run's ``device`` rows over that same batch.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sparsetrace.checkpoint import list_checkpoints
from sparsetrace.config import load_config
from sparsetrace.data import batch_indices, get_batch, prepare_data
from sparsetrace.metrics import use_stats_from_counts
from sparsetrace.model.transformer import Transformer
from sparsetrace.rundir import load_run
from sparsetrace.train.loop import train
from torchrun import torchrun

pytestmark = pytest.mark.slow
METRICS = ["per_token", "per_sequence", "per_batch", "p50", "p65", "p75", "p90"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def torchrun_train(cache: Path, out: Path, *args: str) -> None:
    torchrun("-m", "sparsetrace", "train", "--preset", "tiny", "--out_dir", str(out), *args,
             env={"SPARSETRACE_CACHE": str(cache)})  # fmt: skip


def single(cache: Path, out: Path, monkeypatch, *args: str, resume: bool = False) -> Path:
    monkeypatch.setenv("SPARSETRACE_CACHE", str(cache))
    return train(load_config("tiny", ["--out_dir", str(out), *args]), resume=resume)


@pytest.fixture(scope="module")
def ddp_run(cache: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    torchrun_train(cache, out, "--run_name", "ddp", "--train.batch_size", "2")
    return out / "ddp"


def test_two_processes_equal_one_process_on_the_global_batch(
    ddp_run: Path, cache: Path, tmp_path: Path, monkeypatch
) -> None:
    ref = load_run(single(cache, tmp_path, monkeypatch, "--run_name", "b4",
                          "--train.batch_size", "4"))  # fmt: skip
    accum = load_run(single(cache, tmp_path, monkeypatch, "--run_name", "ga2",
                            "--train.batch_size", "2", "--train.grad_accum", "2"))  # fmt: skip
    dist = load_run(ddp_run)
    np.testing.assert_allclose(dist.train.loss, ref.train.loss, rtol=1e-5)
    np.testing.assert_allclose(dist.train.loss, accum.train.loss, rtol=1e-5)
    np.testing.assert_allclose(dist.eval.val_loss, ref.eval.val_loss, rtol=1e-5)
    assert dist.meta["train"]["world_size"] == 2
    assert dist.meta["train"]["tokens_per_step"] == ref.meta["train"]["tokens_per_step"]
    # Global metrics over 2 x 2 sequences == device metrics of the 1-process batch of 4.
    glob = dist.sparsity[dist.sparsity.scope == "global"].reset_index(drop=True)
    dev1 = ref.sparsity[ref.sparsity.scope == "device"].reset_index(drop=True)
    assert list(glob.step) == list(dev1.step)
    np.testing.assert_allclose(glob[METRICS], dev1[METRICS], rtol=1e-4, atol=1e-6)


def test_device_metrics_match_each_shard_alone(ddp_run: Path, cache: Path, monkeypatch) -> None:
    monkeypatch.setenv("SPARSETRACE_CACHE", str(cache))
    cfg = load_config("tiny", ["--train.batch_size", "2"])
    data = prepare_data(cfg.data)
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model.with_data(data.vocab_size, cfg.data.seq_len))
    n = data.n_sequences("train")
    per_rank = []
    for rank in (0, 1):
        batch = get_batch(data.train, batch_indices(n, 0, 2, cfg.train.seed, rank, 2), 32)
        with torch.no_grad():
            counts = model(batch[:, :-1], measure=True).use_counts
        per_rank.append({k: use_stats_from_counts(c, 32) for k, c in counts.items()})
    rows = load_run(ddp_run).sparsity
    at0 = rows[rows.step == 0].set_index(["scope", "name"])
    for name in per_rank[0]:
        values = [float(s[name].per_token) for s in per_rank]
        assert at0.loc[("device", name), "per_token"] == pytest.approx(values[0])  # rank 0
        assert at0.loc[("device_min", name), "per_token"] == pytest.approx(min(values))
        assert at0.loc[("device_max", name), "per_token"] == pytest.approx(max(values))
        union = per_rank[0][name].batch_used | per_rank[1][name].batch_used
        assert at0.loc[("global", name), "per_batch"] == int(union.sum())


def test_resume_two_processes_and_at_another_world_size(
    ddp_run: Path, cache: Path, tmp_path: Path, monkeypatch
) -> None:
    for name in ("again", "solo"):
        shutil.copytree(ddp_run, tmp_path / name)
        shutil.rmtree(list_checkpoints(tmp_path / name)[-1])  # resume from step 10
    torchrun_train(cache, tmp_path, "--run_name", "again", "--train.batch_size", "2", "--resume")
    straight = load_run(ddp_run)
    again = load_run(tmp_path / "again")
    pd.testing.assert_frame_equal(straight.train.drop(columns="step_time_s"),
                                  again.train.drop(columns="step_time_s"))  # fmt: skip
    pd.testing.assert_frame_equal(straight.sparsity, again.sparsity)
    # The same global batch on one process (batch 4) continues the same curve.
    solo = load_run(single(cache, tmp_path, monkeypatch, "--run_name", "solo",
                           "--train.batch_size", "4", resume=True))  # fmt: skip
    np.testing.assert_allclose(solo.train.loss, straight.train.loss, rtol=1e-5)


def test_fsdp_matches_ddp_and_its_checkpoint_loads_on_one_process(
    ddp_run: Path, cache: Path, tmp_path: Path, monkeypatch
) -> None:
    torchrun_train(cache, tmp_path, "--run_name", "fsdp", "--train.batch_size", "2",
             "--train.parallel", "fsdp")  # fmt: skip
    ddp_loss = load_run(ddp_run).train.loss
    np.testing.assert_allclose(load_run(tmp_path / "fsdp").train.loss, ddp_loss, rtol=1e-5)
    # Unsharded checkpoint: a 1-process run (batch 4 = the same global batch) resumes from it.
    shutil.rmtree(list_checkpoints(tmp_path / "fsdp")[-1])
    solo = load_run(single(cache, tmp_path, monkeypatch, "--run_name", "fsdp",
                           "--train.batch_size", "4", "--train.parallel", "fsdp",
                           resume=True))  # fmt: skip
    np.testing.assert_allclose(solo.train.loss, ddp_loss, rtol=1e-5)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="threads counted in /proc")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_process_whose_gloo_workers_outlive_the_group_leaves_without_finalizing(
    strategy: str, tmp_path: Path
) -> None:
    # FSDP2 (DTensor's functional collectives) keeps the gloo group, and so its worker threads,
    # alive past destroy_process_group; a worker that asks for the GIL while the interpreter
    # finalizes aborts the process (parallelize.leave). Such a process must skip finalization;
    # one whose workers ended with the group (DDP) finalizes as usual.
    script = Path(__file__).with_name("leave_check.py")
    torchrun(str(script), strategy, str(tmp_path / "finalized"))
    finalized = sorted(p.name for p in tmp_path.glob("finalized.*"))
    assert finalized == ([] if strategy == "fsdp" else ["finalized.0", "finalized.1"])
