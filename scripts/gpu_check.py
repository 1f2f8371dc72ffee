"""The prepared device check (run by scripts/gpu_check.sh): every GPU stage in one call.

Stages, each a subprocess under its own time limit, each writing its result before the next
starts (a stage that fails or runs out of time is recorded and the check goes on):

1. env      -- GPU, driver, torch, CPU count, versions of the packages sparsetrace uses;
2. corpus   -- unpack the carried token cache of the `prose` corpus (build/gpu/prose-cache.tar.xz,
               made by scripts/prepare_gpu_check.sh) into the cache, and check that the `gpu`
               preset finds its tokens without the text;
3. bench    -- benchmarks/gpu_bench.py: tokens/s, MFU, tracing overhead (bench.json);
4. cuda     -- tests/test_cuda.py (cuda_tests.xml);
5. run      -- `sparsetrace run --preset gpu`, its steps sized from the measured tokens/s to
               the time left (the `gpu` preset's 40,000 steps at most), compiled only where the
               bench measured a compiled rate (GPU_CHECK_BENCH_S large enough) that pays for its
               compile time; then the report; skipped without the corpus;
6. agree    -- bf16 vs fp32 use metrics of the run's final checkpoint (agreement.json);
7. summary  -- summary.json, the run's report and records (report.tar.xz, no checkpoints), the
               stage logs (logs.tar.xz).

Everything lands in $OUT (at most 8 files). GPU_CHECK_DRY_RUN=1 runs every stage on the CPU at
tiny sizes (checks this script; measures nothing). GPU_CHECK_BUDGET_S (default 540) is the
whole check's time (give the device call ~40 s more); the run gets what the other stages leave.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DRY = os.environ.get("GPU_CHECK_DRY_RUN") == "1"
BUDGET_S = float(os.environ.get("GPU_CHECK_BUDGET_S", "540"))
OUT = Path(os.environ.get("OUT") or ROOT / "gpu-check-out")
WORK = Path(os.environ.get("GPU_CHECK_WORK", "/tmp/gpu-check"))
CACHE = WORK / "cache"
RUNS = WORK / "runs"
LOGS = WORK / "logs"
CORPUS_ARCHIVE = ROOT / "build" / "gpu" / "prose-cache.tar.xz"
TOKENS_PER_STEP = 16 * 512  # the gpu preset's device batch
# Seconds kept for what follows the training: the run's own Sparsing Law pass and report, the
# agreement check and the packing.
AFTER_TRAINING_S = 30 if DRY else 130
RUN_OVERHEAD_S = 20 if DRY else 90  # of AFTER_TRAINING_S: the run's setup, Sparsing Law, report
DRY_MODEL = ["--model.n_layers", "2", "--model.d_model", "32", "--model.n_heads", "2",
             "--model.d_ff", "128", "--data.seq_len", "32", "--train.batch_size", "4",
             "--train.device", "cpu", "--train.precision", "fp32"]  # fmt: skip

START = time.monotonic()
STAGES: list[dict[str, Any]] = []


def left() -> float:
    return BUDGET_S - (time.monotonic() - START)


def stage(name: str, cmd: list[str], limit: float, env: dict[str, str] | None = None) -> bool:
    """Run one stage's command under ``limit`` seconds, its output in logs/NAME.log."""
    t0 = time.monotonic()
    log = LOGS / f"{name}.log"
    shown = " ".join(c if len(c) < 80 else c[:77] + "..." for c in cmd)
    record: dict[str, Any] = {"stage": name, "command": shown, "limit_s": round(limit)}
    with log.open("w") as f:
        try:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=max(limit, 1),
                                  env={**os.environ, **(env or {})}, cwd=ROOT)  # fmt: skip
            record["rc"] = proc.returncode
        except subprocess.TimeoutExpired:
            record["rc"] = "timeout"
        except OSError as err:  # e.g. a command this machine does not have
            record["rc"] = f"error: {err}"
    record["seconds"] = round(time.monotonic() - t0, 1)
    STAGES.append(record)
    print(f"[{time.monotonic() - START:6.0f} s] {name}: rc {record['rc']} in "
          f"{record['seconds']} s", flush=True)  # fmt: skip
    write_summary({})
    return record["rc"] == 0


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def env_stage() -> None:
    code = (
        "import json, os, platform, torch, importlib.metadata as m\n"
        "pk = {}\n"
        "for n in ('numpy','pandas','scipy','matplotlib','tokenizers','safetensors','pyarrow',"
        "'transformers','accelerate','numba','tensorboard','pytest','hypothesis','datasets'):\n"
        "    try: pk[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: pk[n] = None\n"
        "cuda = torch.cuda.is_available()\n"
        "p = torch.cuda.get_device_properties(0) if cuda else None\n"
        "print(json.dumps({'python': platform.python_version(), 'torch': torch.__version__,"
        " 'cuda': torch.version.cuda, 'gpu': torch.cuda.get_device_name() if cuda else None,"
        " 'gpu_memory_gib': p.total_memory / 2**30 if p else None,"
        " 'capability': list(torch.cuda.get_device_capability()) if cuda else None,"
        " 'sms': p.multi_processor_count if p else None, 'cpus': os.cpu_count(),"
        " 'packages': pk}))\n"
    )
    stage("env", python("-c", code), 60)
    if not DRY:
        stage("nvidia_smi", ["nvidia-smi"], 20)


def corpus_stage() -> list[str] | None:
    """The data overrides for the run: the carried prose tokens, or (dry run without them) the
    embedded corpus; None: no usable corpus."""
    if CORPUS_ARCHIVE.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        unpack = (f"import tarfile; tarfile.open({str(CORPUS_ARCHIVE)!r})"
                  f".extractall({str(CACHE)!r}, filter='data')")  # fmt: skip
        ok = stage("corpus", python("-c", unpack), 60)
        check = ("from sparsetrace.config import load_config\n"
                 "from sparsetrace.data import prepare_data\n"
                 "d = prepare_data(load_config('gpu').data).info\n"
                 "print(d['cache_key'], d['n_train_tokens'], d['n_val_tokens'])\n")  # fmt: skip
        env = {"SPARSETRACE_CACHE": str(CACHE)}
        if ok and stage("corpus_check", python("-c", check), 60, env):
            return []
    if not DRY:
        return None  # no run without its corpus; the other stages still go
    return ["--data.source", "embedded", "--data.tokenizer", "bytes"]


def plan_run(bench: dict[str, Any]) -> tuple[int, bool, float]:
    """(steps, compile, training seconds) from the bench's tokens/s and the time left."""
    rows = {r["name"]: r for r in bench.get("configs", [])}
    eager = [r for n, r in rows.items() if n.startswith("gpu_traced")]
    rate = max((r["tokens_per_s"] for r in eager), default=0.0)
    seconds = max(left() - AFTER_TRAINING_S, 0.0)
    if DRY:
        return 40, False, seconds
    compiled = rows.get("gpu_compiled")
    use_compile = False
    if compiled and rate:
        # compiled wins only if its extra tokens pay for its compilation inside this run
        c_rate, c_cost = compiled["tokens_per_s"], compiled["first_read_s"]
        use_compile = (seconds - c_cost) * c_rate > seconds * rate * 1.05
        rate = c_rate if use_compile else rate
        seconds = seconds - c_cost if use_compile else seconds
    if not rate:
        rate = 5e5  # no measurement: a cautious guess, the run's own timing will tell
    unit = 800  # 8 checkpoints x the read interval of 100 steps
    steps = int(min(40_000, max(unit, math.floor(0.9 * seconds * rate / TOKENS_PER_STEP))))
    return steps // unit * unit, use_compile, seconds


def run_stage(data: list[str]) -> Path | None:
    bench_file = OUT / "bench.json"
    bench = json.loads(bench_file.read_text()) if bench_file.exists() else {}
    steps, use_compile, seconds = plan_run(bench)
    every = str(steps // 8)
    args = ["--train.steps", str(steps), "--checkpoint.every", every, "--eval.every", every,
            "--out_dir", str(RUNS), "--train.compile", str(use_compile).lower()]  # fmt: skip
    if DRY:
        args += [*DRY_MODEL, "--trace.every", "5", "--train.log_every", "5"]
    cmd = python("-m", "sparsetrace", "run", "--preset", "gpu", "--sparsing-tokens",
                 "1024" if DRY else "8192", *data, *args)  # fmt: skip
    STAGES.append({"stage": "plan", "steps": steps, "compile": use_compile,
                   "training_s_planned": round(seconds)})  # fmt: skip
    limit = left() - AFTER_TRAINING_S + RUN_OVERHEAD_S
    stage("run", cmd, limit, {"SPARSETRACE_CACHE": str(CACHE)})
    run = RUNS / "gpu"
    return run if (run / "meta.json").exists() else None


def summarise(run: Path | None) -> dict[str, Any]:
    """The issue's headline numbers from the bench, the run and the agreement check; whatever
    is missing or broken is left out (with its error), never a reason to write no summary."""
    out: dict[str, Any] = {}
    env_log = LOGS / "env.log"
    lines = env_log.read_text().strip().splitlines() if env_log.exists() else []
    if lines and lines[-1].startswith("{"):
        out["env"] = json.loads(lines[-1])
    if (OUT / "bench.json").exists():
        bench = json.loads((OUT / "bench.json").read_text())
        for key in ("device", "torch", "mfu_paper_shape", "mfu_paper_shape_vs_measured_matmul",
                    "tokens_per_s_gpu_preset", "tracing_overhead", "matmul_flops_measured",
                    "peak_bf16_flops"):  # fmt: skip
            out[key] = bench.get(key)
    if run is not None:
        try:
            out.update(run_numbers(run))
        except Exception as err:
            out["run_summary_error"] = repr(err)[:500]
    if (OUT / "agreement.json").exists():
        agreement = json.loads((OUT / "agreement.json").read_text())
        out["bf16_fp32_max_abs_diff_points"] = agreement["max_abs_diff_points"]
    return out


def run_numbers(run: Path) -> dict[str, Any]:
    """The run's tokens, time and data passes, its validation losses, layer 0 and the findings
    by the report's own rules."""
    import pandas as pd

    from sparsetrace.claims import HOLDS
    from sparsetrace.report.build import load
    from sparsetrace.report.findings import FINDINGS, evaluate

    meta = json.loads((run / "meta.json").read_text())
    out: dict[str, Any] = {
        "run_status": meta.get("status"),
        "train_tokens": meta.get("step", 0) * meta["train"]["tokens_per_step"],
        "train_seconds": meta.get("elapsed_s"),
        "data": {k: meta["data"]["corpus"].get(k) for k in ("name", "n_bytes", "licence")},
        "data_epochs": meta["train"].get("epochs"),
    }
    if (run / "eval.csv").exists():
        losses = pd.read_csv(run / "eval.csv").val_loss.to_numpy()
        out["val_loss"] = losses.tolist()
        out["val_loss_still_falling"] = bool(len(losses) > 1 and losses[-1] < losses[-2])
    (rd,) = load([run])
    verdicts = evaluate(rd)
    out.update({
        "end_step": rd.end_step,
        "layer0_per_batch": float(rd.layers.loc[0, "per_batch"]),
        "layer0_turned_off": float(rd.layers.loc[0, "turned_off"]),
        "per_batch_by_layer": [float(v) for v in rd.layers["per_batch"]],
        "findings_hold": sum(v.outcome == HOLDS for v in verdicts.values()),
        "findings_total": len(FINDINGS),
        "findings": {f.key: verdicts[f.key].outcome for f in FINDINGS},
    })  # fmt: skip
    return out


def write_summary(results: dict[str, Any]) -> None:
    summary = {"dry_run": DRY, "budget_s": BUDGET_S, "host": platform.node(),
               "check_seconds": round(time.monotonic() - START, 1), **results,
               "stages": STAGES}  # fmt: skip
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2))


def pack_report(run: Path | None) -> None:
    """The run's report and records, without checkpoints and TensorBoard files."""
    if run is not None:
        with tarfile.open(OUT / "report.tar.xz", "w:xz") as tar:
            for path in sorted(run.iterdir()):
                if path.name not in ("checkpoints", "tb"):
                    tar.add(path, arcname=f"gpu/{path.name}")


def main() -> None:
    for old in (RUNS, LOGS):  # a run left by an earlier check would make this one gpu-2
        shutil.rmtree(old, ignore_errors=True)
    OUT.mkdir(parents=True, exist_ok=True)
    LOGS.mkdir(parents=True, exist_ok=True)
    print(f"gpu_check: budget {BUDGET_S:.0f} s, dry run {DRY}, out {OUT}", flush=True)
    run = None
    try:
        env_stage()
        data = corpus_stage()
        bench_s = os.environ.get("GPU_CHECK_BENCH_S", "40" if DRY else "90")
        bench = python("benchmarks/gpu_bench.py", "--out", str(OUT / "bench.json"), "--budget-s",
                       bench_s, *(["--dry-run"] if DRY else []))  # fmt: skip
        stage("bench", bench, float(bench_s) + 60)
        cuda_env = {"SPARSETRACE_CUDA_TESTS_ON_CPU": "1"} if DRY else {}
        tests = python("-m", "pytest", "tests/test_cuda.py", "-q", "-rs", "-p",
                       "no:cacheprovider", f"--junitxml={OUT / 'cuda_tests.xml'}")  # fmt: skip
        stage("cuda_tests", tests, 150, cuda_env)
        if data is None:
            STAGES.append({"stage": "run", "rc": f"skipped: no corpus at {CORPUS_ARCHIVE}"})
        else:
            run = run_stage(data)
            pack_report(run)  # now: a call cut short later still brings the run back
        if run is not None:
            device = "cpu" if DRY else "cuda"
            agree = python("benchmarks/bf16_stats.py", str(run), "--device", device, "--json",
                           str(OUT / "agreement.json"))  # fmt: skip
            stage("agreement", agree, max(min(60, left() - 15), 10),
                  {"SPARSETRACE_CACHE": str(CACHE)})  # fmt: skip
    finally:
        results = summarise(run)
        write_summary(results)
        with tarfile.open(OUT / "logs.tar.xz", "w:xz") as tar:
            tar.add(LOGS, arcname="logs")
    print(json.dumps({k: v for k, v in results.items() if k != "findings"}, indent=2))


if __name__ == "__main__":
    main()
