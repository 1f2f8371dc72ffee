"""Portable CPU arithmetic (``train.arithmetic portable``): the same bits on every x86-64 CPU.

The reference below is what the ``cpu`` preset computes in its first three steps with portable
arithmetic, recorded on an AMD EPYC host with AVX-512 (whose native kernels give other bits from
the first gradient norm on). Every other x86-64 host with AVX2 must reproduce it to the last
printed digit: that is the claim ``make run``'s documented findings rest on.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from sparsetrace.device import mkl_branch, use_arithmetic
from sparsetrace.errors import UserError

# train.csv's loss and grad_norm at steps 0-2 (8 significant digits, as the loop writes them).
REFERENCE = [("8.7904615", "5.5222468"), ("8.6120586", "6.2433619"), ("8.398715", "5.5381117")]

portable_host = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64")
    or not torch.backends.mkl.is_available()
    or "avx2" not in Path("/proc/cpuinfo").read_text(errors="replace"),
    reason="portable arithmetic needs an x86-64 CPU with AVX2 and PyTorch with MKL (Linux)",
)


def _train_three_steps(base: Path, arithmetic: str) -> tuple[list[tuple[str, str]], dict]:
    """The cpu preset for three steps in a new process (the arithmetic is chosen per process),
    with neither choice already in its environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}
    env["SPARSETRACE_CACHE"] = str(base / "cache")
    command = [sys.executable, "-m", "sparsetrace", "train", "--preset", "cpu",
               "--train.steps", "3", "--train.arithmetic", arithmetic,
               "--out_dir", str(base), "--run_name", arithmetic]  # fmt: skip
    subprocess.run(command, env=env, check=True, capture_output=True)
    rows = pd.read_csv(base / arithmetic / "train.csv", dtype=str)
    meta = json.loads((base / arithmetic / "meta.json").read_text())
    return list(zip(rows["loss"], rows["grad_norm"], strict=True)), meta


@pytest.mark.slow
@portable_host
def test_portable_training_computes_the_reference_bits_and_says_how(tmp_path: Path) -> None:
    values, meta = _train_three_steps(tmp_path, "portable")
    assert (meta["arithmetic"], meta["cpu_capability"], meta["mkl_cbwr"], meta["threads"]) == (
        "portable", "AVX2", "COMPATIBLE", 2,
    )  # fmt: skip
    assert values == REFERENCE


@pytest.mark.slow
@portable_host
def test_native_training_keeps_the_hosts_own_kernels(tmp_path: Path) -> None:
    _, meta = _train_three_steps(tmp_path, "native")
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    own = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"},
    )
    assert meta["arithmetic"] == "native"
    assert meta["cpu_capability"] == own.stdout.strip()
    assert meta["mkl_cbwr"] in ("off", None)


@portable_host
def test_portable_arithmetic_refuses_a_process_that_already_computed(capsys) -> None:
    names = ("ATEN_CPU_CAPABILITY", "MKL_CBWR")
    before = {name: os.environ.get(name) for name in names}
    threads = torch.get_num_threads()
    (torch.ones(8, 8) @ torch.ones(8, 8)).sum()
    kernels, branch = torch.backends.cpu.get_cpu_capability(), mkl_branch()
    if kernels == "AVX2" and branch in ("COMPATIBLE", None):
        pytest.skip("this process already computes portably (or cannot tell): nothing to refuse")
    with pytest.raises(UserError, match="ran tensor operations before"):
        use_arithmetic("portable", 0, torch.device("cpu"))
    use_arithmetic("portable", 0, torch.device("cpu"), strict=False)
    assert "warning: train.arithmetic portable" in capsys.readouterr().err
    # Refused, the process keeps what it had: its environment and its thread count.
    assert {name: os.environ.get(name) for name in names} == before
    assert torch.get_num_threads() == threads
    use_arithmetic("portable", 0, torch.device("cuda"))  # a GPU run ignores the CPU's mode
    assert torch.get_num_threads() == threads


@pytest.mark.slow
@portable_host
def test_pruning_a_portable_run_measures_its_batch_portably(tmp_path: Path) -> None:
    """`prune` measures the step's batch before it trains: it must choose the run's arithmetic
    first (else the training step refuses a process that already computed natively)."""
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}
    env["SPARSETRACE_CACHE"] = str(tmp_path / "cache")
    cli = [sys.executable, "-m", "sparsetrace"]
    subprocess.run([*cli, "train", "--preset", "tiny", "--train.arithmetic", "portable",
                    "--out_dir", str(tmp_path), "--run_name", "r"],
                   env=env, check=True, capture_output=True)  # fmt: skip
    command = [*cli, "prune", str(tmp_path / "r"), "10", "--out", str(tmp_path / "p")]
    pruned = subprocess.run(command, env=env, capture_output=True, text=True)
    assert pruned.returncode == 0, pruned.stderr
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    assert (meta["arithmetic"], meta["cpu_capability"], meta["mkl_cbwr"]) == (
        "portable", "AVX2", "COMPATIBLE",
    )  # fmt: skip
