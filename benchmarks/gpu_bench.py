"""Training throughput on one GPU: tokens/s and MFU of the `paper` shape and the `gpu` preset.

    python benchmarks/gpu_bench.py --out bench.json [--budget-s 150] [--dry-run]

Each configuration runs sparsetrace's own training loop (``train.train``: the real step, the
host reads every ``log_every`` steps, the sparsity recording) on synthetic tokens of the preset's
vocabulary, with no checkpoints; the time of the steps after the first read (compilation and
warm-up) and before the last (the final measurement) is what is timed. Printed and written:

- the bf16 matrix-product rate measured here (8192^3, mean of 10 after 3 warm-ups);
- per configuration: tokens/s, ms per step, model FLOPs per token (PaLM's count: 6 x the
  matmul parameters, output head included, plus 12 x layers x d_model x seq_len for attention),
  MFU against the GPU's dense bf16 peak (datasheet, where the GPU is known) and against the
  measured matmul rate;
- the tracing overhead at trace.every 100: the `gpu` preset traced / untraced - 1, the two
  alternated twice, medians.

Configurations run in priority order (the `gpu` preset eager untraced and traced, the `paper`
shape eager, the `gpu` pair again, then compiled ones) while the budget lasts; what did not fit
is listed as skipped.
The JSON is rewritten after each configuration, so a run cut short keeps what it measured.
``--dry-run``: the same code on the CPU at tiny sizes (checks the script, measures nothing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparsetrace.config import RunConfig, load_config
from sparsetrace.data import PreparedData
from sparsetrace.model.transformer import ModelConfig
from sparsetrace.rundir import load_run
from sparsetrace.train import loop

# Dense bf16 tensor-core peaks (vendor datasheets, without sparsity), by device name.
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}
TINY = ["--model.n_layers", "2", "--model.d_model", "32", "--model.n_heads", "2",
        "--model.d_ff", "128", "--data.seq_len", "32", "--train.batch_size", "2",
        "--train.device", "cpu", "--train.precision", "fp32"]  # fmt: skip


def peak_bf16(name: str) -> float | None:
    for key, peak in PEAK_BF16.items():  # "H100 PCIe" before "H100"
        if key in name:
            return peak
    return None


def matmul_rate(device: torch.device, n: int, dtype: torch.dtype) -> float:
    """FLOP/s of an n x n x n product: mean of 10 after 3 warm-ups."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    _sync(device)
    return 10 * 2 * n**3 / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def flops_per_token(m: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (PaLM, appendix B): 6 N + 12 L d T, N the matmul parameters
    (attention, MLP, output head; embeddings are lookups)."""
    per_layer = [4 * m.d_model**2 + m.d_model * w * (3 if m.activation.endswith("glu") else 2)
                 for w in m.widths]  # fmt: skip
    n = sum(per_layer) + m.d_model * m.vocab_size
    return 6 * n + 12 * m.n_layers * m.d_model * seq_len


def synthetic_data(vocab: int, seq_len: int, n_tokens: int, seed: int = 0) -> PreparedData:
    """Uniform random tokens: the throughput of a shape does not depend on the text."""
    rng = np.random.default_rng(seed)
    dtype = np.uint16 if vocab < 65536 else np.uint32
    train = rng.integers(0, vocab, n_tokens, dtype=np.int64).astype(dtype)
    val = rng.integers(0, vocab, 64 * (seq_len + 1), dtype=np.int64).astype(dtype)
    info = {"corpus": {"name": "synthetic uniform tokens"}, "n_train_tokens": n_tokens}
    return PreparedData(train=train, val=val, vocab_size=vocab, eot_id=0, tokenizer=None,
                        info=info, seq_len=seq_len)  # fmt: skip


def measure(preset: str, overrides: list[str], steps: int, log_every: int, out: Path,
            name: str) -> dict[str, Any]:  # fmt: skip
    """Train ``steps`` steps with the loop; time the reads between the first and the last."""
    args = [*overrides, "--out_dir", str(out), "--run_name", name, "--train.steps", str(steps),
            "--train.log_every", str(log_every), "--checkpoint.every", "0",
            "--eval.every", str(10 * steps), "--eval.batches", "1"]  # fmt: skip
    cfg: RunConfig = load_config(preset, args)
    n_tokens = max(2_000_000, 4 * cfg.train.batch_size * (cfg.data.seq_len + 1))
    data = synthetic_data(cfg.model.vocab_size or cfg.data.vocab_size, cfg.data.seq_len, n_tokens)
    cfg.model.vocab_size = data.vocab_size
    t0 = time.perf_counter()
    run_dir = loop.train(cfg, data=data)
    wall = time.perf_counter() - t0
    train = load_run(run_dir).train
    timed = train[(train.step >= log_every) & (train.step < steps - log_every)]
    step_s = float(timed.step_time_s.mean())
    tokens = cfg.train.batch_size * cfg.data.seq_len
    model = cfg.model.with_data(data.vocab_size, cfg.data.seq_len)
    return {
        "name": name, "preset": preset, "compiled": cfg.train.compile,
        "trace_every": cfg.trace.every, "precision": cfg.train.precision,
        "steps_timed": len(timed), "step_ms": 1e3 * step_s, "tokens_per_step": tokens,
        "tokens_per_s": tokens / step_s,
        "flops_per_token": flops_per_token(model, cfg.data.seq_len),
        "wall_s": wall, "first_read_s": float(train[train.step < log_every].step_time_s.sum()),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="the JSON to write")
    ap.add_argument("--budget-s", type=float, default=150.0, help="stop starting new configs")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    args = ap.parse_args()
    start = time.perf_counter()
    dry = args.dry_run or not torch.cuda.is_available()
    device = torch.device("cpu" if dry else "cuda")
    name = "cpu (dry run)" if dry else torch.cuda.get_device_name()
    rate = matmul_rate(device, 256 if dry else 8192, torch.float32 if dry else torch.bfloat16)
    result: dict[str, Any] = {
        "device": name, "torch": torch.__version__, "dry_run": dry,
        "matmul_flops_measured": rate, "peak_bf16_flops": None if dry else peak_bf16(name),
        "configs": [], "skipped": [],
    }  # fmt: skip
    kind = "fp32" if dry else "bf16"
    print(f"{name}: {kind} matmul {rate / 1e12:.1f} TFLOP/s measured", flush=True)
    tiny = TINY if dry else []
    steps, log_every, paper_steps = (30, 5, 15) if dry else (400, 100, 40)
    paper_log = 5 if dry else 10
    # (name, preset, overrides, steps, read interval, seconds that must be left to start it)
    plan = [
        ("gpu_untraced_a", "gpu", ["--trace.every", "0"], steps, log_every, 20),
        ("gpu_traced_a", "gpu", ["--trace.every", "100"], steps, log_every, 20),
        ("paper_eager", "paper", ["--trace.every", "100"], paper_steps, paper_log, 30),
        ("gpu_untraced_b", "gpu", ["--trace.every", "0"], steps, log_every, 20),
        ("gpu_traced_b", "gpu", ["--trace.every", "100"], steps, log_every, 20),
        ("gpu_compiled", "gpu", ["--trace.every", "100", "--train.compile", "true"], steps,
         log_every, 90),
        ("paper_compiled", "paper", ["--trace.every", "100", "--train.compile", "true"],
         paper_steps, paper_log, 120),
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for cname, preset, overrides, n, every, need in plan:
            left = args.budget_s - (time.perf_counter() - start)
            if left < (need / 10 if dry else need):
                result["skipped"].append({"name": cname, "reason": f"{left:.0f} s left"})
                continue
            if dry:  # trace.every 100 would never measure in 30 steps
                overrides = [o if o != "100" else "5" for o in overrides]
            row = measure(preset, [*tiny, *overrides], n, every, Path(tmp), cname)
            peak = result["peak_bf16_flops"]
            model_flops = row["tokens_per_s"] * row["flops_per_token"]
            row["mfu_peak"] = model_flops / peak if peak else None
            row["mfu_measured_matmul"] = model_flops / rate
            result["configs"].append(row)
            print(f"{cname:16s} {row['tokens_per_s']:>12,.0f} tok/s  {row['step_ms']:8.2f} ms/step"
                  f"  MFU {row['mfu_peak'] or float('nan'):.3f} of peak, "
                  f"{row['mfu_measured_matmul']:.3f} of measured matmul", flush=True)  # fmt: skip
            _summarise(result)
            args.out.write_text(json.dumps(result, indent=2))
    _summarise(result)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "configs"}, indent=2))


def _summarise(result: dict[str, Any]) -> None:
    """The headline numbers: the `gpu` preset's traced tokens/s, the paper shape's MFU, the
    tracing overhead (medians of the alternated pairs)."""
    rows = {r["name"]: r for r in result["configs"]}

    def median(prefix: str) -> float | None:
        values = [r["step_ms"] for n, r in rows.items() if n.startswith(prefix)]
        return statistics.median(values) if values else None

    traced, untraced = median("gpu_traced"), median("gpu_untraced")
    result["tracing_overhead"] = traced / untraced - 1 if traced and untraced else None
    eager = [r for n, r in rows.items() if n.startswith("gpu_traced")]
    best = max(eager, key=lambda r: r["tokens_per_s"], default=None)
    if "gpu_compiled" in rows and (best is None or rows["gpu_compiled"]["tokens_per_s"]
                                   > best["tokens_per_s"]):  # fmt: skip
        best = rows["gpu_compiled"]
    result["tokens_per_s_gpu_preset"] = best["tokens_per_s"] if best else None
    result["gpu_preset_compile_faster"] = best is not None and best["compiled"]
    papers = [r for n, r in rows.items() if n.startswith("paper")]
    top = max(papers, key=lambda r: r["tokens_per_s"], default=None)
    result["mfu_paper_shape"] = top["mfu_peak"] if top else None
    result["mfu_paper_shape_vs_measured_matmul"] = top["mfu_measured_matmul"] if top else None


if __name__ == "__main__":
    main()
