"""sparsetrace on a CUDA GPU: counts, metrics, training, checkpoints, hooks and collectives.

Every test here runs on the GPU where one is present and skips, saying why, where none is.
``SPARSETRACE_CUDA_TESTS_ON_CPU=1`` runs them on the CPU instead (gloo for the collectives):
that checks the tests themselves before a GPU is at hand (``scripts/gpu_check.sh``'s dry run),
not the GPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
from torch import nn

import sparsetrace
from sparsetrace import checkpoint
from sparsetrace.config import load_config
from sparsetrace.device import autocast, configure_backends
from sparsetrace.metrics import use_stats, use_stats_from_counts
from sparsetrace.model.transformer import ModelConfig, Transformer
from sparsetrace.rundir import load_run
from sparsetrace.train import loop, parallelize

pytestmark = pytest.mark.cuda
ON_CPU = os.environ.get("SPARSETRACE_CUDA_TESTS_ON_CPU") == "1"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


@pytest.fixture
def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if ON_CPU:
        return torch.device("cpu")
    pytest.skip("no CUDA GPU (SPARSETRACE_CUDA_TESTS_ON_CPU=1 runs these tests on the CPU)")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch) -> None:
    monkeypatch.setenv("SPARSETRACE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """A trainer turns TF32 on for its process: each test starts and ends in full fp32."""
    configure_backends(torch.device("cuda"), tf32=False)
    yield
    configure_backends(torch.device("cuda"), tf32=False)


@pytest.fixture
def deterministic():
    """Deterministic kernels (resume must be exact): cuBLAS's deterministic mode, and attention
    by the math backend (the fused kernels' backward passes may accumulate in any order)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.use_deterministic_algorithms(True, warn_only=True)
    with sdpa_kernel(SDPBackend.MATH):
        yield
    torch.use_deterministic_algorithms(False)


def small_model(device: torch.device, seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=2, d_ff=96, style="t5", pos="sinusoidal",
                      vocab_size=64, seq_len=24, **kw)  # fmt: skip
    return Transformer(cfg).to(device)


def tokens(device: torch.device, batch: int = 4, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (batch, 24), generator=gen).to(device)


def hooked_counts(model: Transformer, idx: torch.Tensor, amp: torch.dtype | None) -> dict:
    """Per-sequence use counts from forward hooks on each down projection's input: another site
    and another code path than the model's in-graph counts."""
    counts, handles = {}, []
    for name, mlp in model.mlps().items():

        def hook(_module, args, name=name):
            counts[name] = (args[0] != 0).sum(dim=-2, dtype=torch.int32)

        handles.append(mlp.w_out.register_forward_pre_hook(hook))
    with torch.no_grad(), autocast(idx.device, amp):
        model(idx)
    for h in handles:
        h.remove()
    return counts


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_in_graph_counts_equal_hooked_counts(device, precision) -> None:
    model, idx = small_model(device), tokens(device)
    amp = PRECISIONS[precision]
    with torch.no_grad(), autocast(device, amp):
        out = model(idx, measure=True)
    hooked = hooked_counts(model, idx, amp)
    assert set(out.use_counts) == set(hooked) == set(model.mlps())
    for name, c in out.use_counts.items():
        assert c.device.type == device.type
        assert torch.equal(c, hooked[name]), name
        assert 0 < int(c.sum()) < c.numel() * idx.shape[1]  # neither all off nor all on


def test_compiled_equals_eager(device) -> None:
    model, idx = small_model(device), tokens(device)
    with torch.no_grad():
        eager = model(idx, idx, measure=True)
        compiled = torch.compile(model)(idx, idx, measure=True)
    for name, c in eager.use_counts.items():
        assert torch.equal(compiled.use_counts[name], c), name
    torch.testing.assert_close(compiled.logits, eager.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled.loss, eager.loss, rtol=1e-5, atol=1e-5)


def test_use_stats_on_the_device_equal_the_cpus(device) -> None:
    gen = torch.Generator().manual_seed(3)
    acts = torch.relu(torch.randn(3, 5, 16, 40, generator=gen) - 0.8)  # (layers, batch, seq, h)
    mask = torch.ones(5, 16, dtype=torch.bool)
    mask[1, 9:] = False  # padding at the end of one sequence
    pct = (50.0, 65.0, 75.0, 90.0)
    cpu, dev = use_stats(acts, mask, pct), use_stats(acts.to(device), mask.to(device), pct)
    for key in ("per_token", "per_sequence", "per_batch"):
        got = getattr(dev, key)
        assert got.device.type == device.type
        torch.testing.assert_close(got.cpu(), getattr(cpu, key), rtol=1e-12, atol=0)
    for p in pct:
        torch.testing.assert_close(dev.percentiles[p].cpu(), cpu.percentiles[p], rtol=1e-12,
                                   atol=1e-12)  # fmt: skip
    assert torch.equal(dev.batch_used.cpu(), cpu.batch_used)


def test_ppl_sparsity_of_a_transformers_model_on_the_device_equals_the_cpus(device) -> None:
    """The Sparsing Law on a Hugging Face model (hooks on a GPT-2 Conv1D down projection, the
    CETT curves and the search) on the device: the CPU's c, thresholds and ratio, within fp32
    reduction-order tolerance."""
    from sparsetrace.sparsing.search import Subject, TokenBatch, ppl_sparsity

    transformers = pytest.importorskip("transformers")  # a GPU machine may lack it
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_inner=64,
                                     activation_function="relu", n_positions=64,
                                     vocab_size=96)  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).eval()
    gen = torch.Generator().manual_seed(1)
    windows = [torch.randint(0, 96, (4, 17), generator=gen) for _ in range(2)]
    batches = [TokenBatch(w[:, :-1], w[:, 1:]) for w in windows]
    cpu = ppl_sparsity(Subject(model, batches), 5.0).measurement
    on_device = ppl_sparsity(Subject(model.to(device), batches), 5.0).measurement
    assert on_device.cett == pytest.approx(cpu.cett, rel=1e-4)
    assert on_device.activation_ratio == pytest.approx(cpu.activation_ratio, abs=1e-3)
    assert on_device.ppl_ratio == pytest.approx(cpu.ppl_ratio, rel=1e-4)
    for name, layer in cpu.layers.items():
        assert on_device.layers[name].tau == pytest.approx(layer.tau, rel=1e-4)


def tiny(tmp_path: Path, name: str, device: torch.device, *extra: str):
    return load_config("tiny", ["--out_dir", str(tmp_path), "--run_name", name,
                                "--train.device", device.type, *extra])  # fmt: skip


def _frames(run_dir: Path) -> dict[str, pd.DataFrame]:
    run = load_run(run_dir)
    return {"train": run.train.drop(columns="step_time_s"), "eval": run.eval,
            "sparsity": run.sparsity}  # fmt: skip


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_tiny_trainer_runs_on_the_device(tmp_path, device, precision) -> None:
    run_dir = loop.train(tiny(tmp_path, precision, device, "--train.precision", precision,
                              "--train.log_every", "4"))  # fmt: skip
    run = load_run(run_dir)
    assert run.meta["status"] == "finished" and run.meta["device"].startswith(device.type)
    assert run.meta["precision"] == precision
    assert list(run.train.step) == list(range(20)) and run.train.loss.notna().all()
    assert run.train.loss.iloc[-1] < run.train.loss.iloc[0]
    device_rows = run.sparsity[run.sparsity.scope == "device"]
    assert device_rows.step.tolist() == [s for s in (0, 5, 10, 15, 19) for _ in range(2)]
    # The lifecycle agrees with the sparsity rows of the last measured step.
    last = run.sparsity[run.sparsity.step == 19].set_index("layer")["per_batch_frac"]
    for layer, row in run.lifecycle["layers"].items():
        assert row["summary"]["final_use"] == pytest.approx(last[int(layer)])


def test_resume_on_the_device_equals_the_straight_run_in_fp32(
    tmp_path, device, deterministic, monkeypatch
) -> None:
    straight = loop.train(tiny(tmp_path, "straight", device))
    original = loop.runmeta.Progress.update

    def killed_at_13(self, done: int, loss: float) -> None:
        original(self, done, loss)
        if done == 13:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop.runmeta.Progress, "update", killed_at_13)
    with pytest.raises(KeyboardInterrupt):
        loop.train(tiny(tmp_path, "resumed", device))
    monkeypatch.setattr(loop.runmeta.Progress, "update", original)
    resumed = loop.train(tiny(tmp_path, "resumed", device), resume=True)
    a, b = _frames(straight), _frames(resumed)
    for key in a:
        pd.testing.assert_frame_equal(a[key], b[key], check_exact=True, obj=key)


def test_a_checkpoint_written_on_the_device_loads_on_the_cpu(tmp_path, device) -> None:
    cfg = tiny(tmp_path, "r", device, "--train.tf32", "false")  # logits compared with the CPU's
    session = loop.setup(cfg)
    for step in range(3):
        loop._train_step(session, step, measure=False)
    loop._checkpoint(session, 3)
    assert session.checkpoints.background == (device.type == "cuda")
    session.checkpoints.wait()
    fused = [g["fused"] for g in session.optimizer.param_groups]
    assert fused == [True if device.type == "cuda" else None] * len(fused)
    loop.runmeta.write_config_and_meta(session.run_dir, session.cfg, {})
    model = session.model.eval()
    idx = tokens(device, seed=5) % cfg.model.vocab_size
    with torch.no_grad():
        on_device = model(idx, measure=True)
    cpu_model, _ = checkpoint.load_trained_model(session.run_dir)
    with torch.no_grad():
        on_cpu = cpu_model(idx.cpu(), measure=True)
    assert next(cpu_model.parameters()).device.type == "cpu"
    torch.testing.assert_close(on_cpu.logits, on_device.logits.cpu(), rtol=1e-4, atol=1e-4)
    state = checkpoint.load_state(checkpoint.list_checkpoints(session.run_dir)[-1])
    assert state["step"] == 3 and state["optimizer"]["state"]


def test_recorder_and_trace_on_a_device_model(tmp_path, device) -> None:
    model = small_model(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    expected = {}
    with sparsetrace.Recorder(model, tmp_path / "rec", every=2, tensorboard=False) as rec:
        for step in range(5):
            idx = tokens(device, seed=10 + step)
            if rec.measures(step):  # the model's own in-graph counts on the same weights
                with torch.no_grad():
                    counts = model(idx, measure=True).use_counts
                expected[step] = {n: float(use_stats_from_counts(c, 24).per_batch)
                                  for n, c in counts.items()}  # fmt: skip
            with rec.step(step):
                loss = model(idx, idx).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    rows = load_run(tmp_path / "rec").sparsity
    assert sorted(rows.step.unique()) == sorted(expected) == [0, 2, 4]
    for step, per_layer in expected.items():
        got = rows[rows.step == step].set_index("name")["per_batch"]
        assert got.to_dict() == per_layer
    idx = tokens(device, seed=99)
    with sparsetrace.trace(model) as t, torch.no_grad():
        model(idx)
    with torch.no_grad():
        counts = model(idx, measure=True).use_counts
    summary = t.summary().set_index("name")
    for name, c in counts.items():
        s = use_stats_from_counts(c, 24)
        assert summary.loc[name, "per_token"] == pytest.approx(float(s.per_token), rel=1e-12)
        assert summary.loc[name, "per_batch"] == float(s.per_batch)


@pytest.fixture
def one_rank_group(device):
    """A process group of one rank (NCCL on the GPU, gloo on the CPU), left afterwards."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    yield parallelize.Dist(rank=0, world_size=1)
    dist.destroy_process_group()


def test_one_rank_group_global_rows_equal_the_device_rows(device, one_rank_group) -> None:
    model, idx = small_model(device), tokens(device)
    with torch.no_grad():
        counts = model(idx, measure=True).use_counts
    local = {n: use_stats_from_counts(c, 24) for n, c in counts.items()}
    glob, lo, hi = parallelize.global_stats(local, one_rank_group)
    for name, s in local.items():
        for scope in (glob, lo, hi):
            assert torch.equal(scope[name].batch_used.cpu(), s.batch_used.cpu())
            for key in ("per_token", "per_sequence", "per_batch"):
                assert float(getattr(scope[name], key)) == float(getattr(s, key)), key


def _one_step(model: nn.Module, params: nn.Module, idx: torch.Tensor) -> None:
    opt = torch.optim.AdamW(params.parameters(), lr=1e-2)
    model(idx, idx).loss.backward()
    opt.step()


def test_one_rank_group_ddp_and_fsdp_steps_equal_a_plain_step(device, one_rank_group) -> None:
    from torch.distributed.fsdp import fully_shard

    idx = tokens(device)
    plain = small_model(device)
    _one_step(plain, plain, idx)
    ddp_inner = small_model(device)
    ddp = nn.parallel.DistributedDataParallel(
        ddp_inner, device_ids=[device.index or 0] if device.type == "cuda" else None
    )
    _one_step(ddp, ddp_inner, idx)
    del ddp  # the DDP wrapper goes before the group (parallelize.shutdown)
    sharded = small_model(device)
    for block in sharded.blocks:
        fully_shard(block)
    fully_shard(sharded)
    _one_step(sharded, sharded, idx)
    full = parallelize.full_model_state(sharded)
    for name, p in plain.named_parameters():
        torch.testing.assert_close(dict(ddp_inner.named_parameters())[name], p, rtol=0, atol=0)
        torch.testing.assert_close(full[name].to(device), p, rtol=1e-6, atol=1e-7)
