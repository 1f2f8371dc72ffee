"""Results that do not depend on the host: the command line pins the CPU kernels (AVX2) and the
CPU presets say fp32 on the CPU; the run records what it computed with."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsetrace.rundir import load_run

pytestmark = pytest.mark.skipif(not torch.cpu._is_avx2_supported(), reason="needs an x86 CPU")
# The `cpu` preset's loss and gradient norm at step 39 of a 40-step run, as train.csv prints
# them, computed with the pinned kernels (ATen AVX2, MKL_CBWR AVX2) in fp32 on two threads. Any
# x86 host with AVX2 must reproduce them bit for bit; a host that does not says the pins are
# not enough there.
REFERENCE_STEP_39 = ("6.4016371", "0.38191268")


def cli(tmp_path: Path, *args: str, **env: str) -> None:
    clean = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}
    subprocess.run([sys.executable, "-m", "sparsetrace", *args], check=True, capture_output=True,
                   env={**clean, "SPARSETRACE_CACHE": str(tmp_path / "cache"), **env})  # fmt: skip


def capability(**env: str) -> str:
    """What a fresh torch process picks by itself (the independent expectation)."""
    clean = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, env={**clean, **env})  # fmt: skip
    return out.stdout.strip()


def test_the_command_line_pins_avx2_and_records_it(tmp_path: Path) -> None:
    common = ["train", "--preset", "tiny", "--out_dir", str(tmp_path), "--train.steps", "2"]
    cli(tmp_path, *common, "--run_name", "pinned")
    assert load_run(tmp_path / "pinned").meta["cpu_capability"] == "AVX2"
    # A variable the user set wins: `default` is the CPU's widest, as in a bare torch process.
    cli(tmp_path, *common, "--run_name", "widest", ATEN_CPU_CAPABILITY="default")
    widest = load_run(tmp_path / "widest").meta["cpu_capability"]
    assert widest == capability(ATEN_CPU_CAPABILITY="default")
    assert load_run(tmp_path / "widest").meta["precision"] == "fp32"


@pytest.mark.slow
def test_the_cpu_preset_computes_the_reference_numbers(tmp_path: Path) -> None:
    cli(tmp_path, "train", "--preset", "cpu", "--out_dir", str(tmp_path), "--train.steps", "40",
        "--trace.every", "20", "--eval.every", "40", "--checkpoint.every", "40",
        "--train.threads", "2")  # fmt: skip
    row = (tmp_path / "cpu" / "train.csv").read_text().splitlines()[-1].split(",")
    header = (tmp_path / "cpu" / "train.csv").read_text().splitlines()[0].split(",")
    got = dict(zip(header, row, strict=True))
    assert (got["step"], got["loss"], got["grad_norm"]) == ("39", *REFERENCE_STEP_39)
