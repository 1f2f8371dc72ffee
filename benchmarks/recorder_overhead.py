"""What does tracing cost inside someone else's training loop? The Recorder (and the Hugging
Face Trainer callback) measuring every 20 steps, against the same training without it.

Whole runs on this shared VM vary by +-15 % from one minute to the next, far more than the
effect, so the figure comes from *step-level interleaving* in one process: three identical
copies of a tiny GPT-2 with ReLU (4 layers, d_model 128, d_ff 1024; the same batches of the
embedded corpus) take turns, step by step, in rotating order: without a recorder; with a
Recorder on an unmeasured step (hooks attached, not armed); with a Recorder on a measured step
(use counts, one host transfer, CSV and lifecycle writes). From the median step times, the
overhead of measuring every N steps is ((N - 1) x unmeasured + measured) / N / without.

Then the Hugging Face Trainer end to end: whole runs with ``attach(trainer, every=20)`` and
without, interleaved round by round after a warm-up run; their ``train_runtime`` ratio is
printed with its spread over rounds (noisy here: read it as a check, not the figure).

    python benchmarks/recorder_overhead.py [--steps 120] [--trainer-steps 60] [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    PrinterCallback,
    Trainer,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

from sparsetrace.config import load_config
from sparsetrace.data import Windows, prepare_data
from sparsetrace.integrations.huggingface import attach
from sparsetrace.recording import Recorder


def run_once(data, steps: int, every: int | None, out: Path) -> float:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_embd=128, n_head=4, n_inner=1024, vocab_size=data.vocab_size,
                        n_positions=data.seq_len, activation_function="relu")  # fmt: skip
    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=16, learning_rate=3e-3,
        warmup_steps=10, logging_steps=20, save_strategy="no", report_to=[], use_cpu=True,
        seed=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=GPT2LMHeadModel(config), args=args,
                      train_dataset=Windows(data.train, data.seq_len))  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # no printing of every log in the timed loop
    if every is not None:
        attach(trainer, every=every)
    return trainer.train().metrics["train_runtime"]


def interleaved(data, steps: int, tmp: Path) -> dict[str, float]:
    """Median step time (s) of: no recorder, an unmeasured recorder step, a measured one."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_embd=128, n_head=4, n_inner=1024, vocab_size=data.vocab_size,
                        n_positions=data.seq_len, activation_function="relu")  # fmt: skip
    base = GPT2LMHeadModel(config)
    models = {k: copy.deepcopy(base) for k in ("without", "unmeasured", "measured")}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in models.items()}
    recs = {"unmeasured": Recorder(models["unmeasured"], tmp / "u", every=10**9),
            "measured": Recorder(models["measured"], tmp / "m", every=1)}  # fmt: skip
    windows = Windows(data.train, data.seq_len)
    times: dict[str, list[float]] = {k: [] for k in models}
    order = list(models)
    for step in range(1, steps + 1):  # step 0 would be measured by both recorders
        batch = torch.stack([windows[(step * 16 + i) % len(windows)]["input_ids"]
                             for i in range(16)])  # fmt: skip
        order = order[1:] + order[:1]  # rotate: no variant always runs first
        for name in order:
            model, opt, rec = models[name], opts[name], recs.get(name)
            t0 = time.perf_counter()
            if rec is not None:
                with rec.step(step):
                    loss = model(input_ids=batch, labels=batch).loss
            else:
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - t0)
    for rec in recs.values():
        rec.close()
    warm = max(1, steps // 10)
    return {k: statistics.median(v[warm:]) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120, help="interleaved steps per variant")
    parser.add_argument("--trainer-steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3, help="Trainer rounds (0: skip)")
    a = parser.parse_args()
    hf_logging.set_verbosity_error()
    data = prepare_data(load_config("cpu").data)
    with tempfile.TemporaryDirectory() as tmp:
        med = interleaved(data, a.steps, Path(tmp))
        base = med["without"]
        print(f"interleaved, {a.steps} steps per variant, torch threads {torch.get_num_threads()}")
        for name, t in med.items():
            print(f"  {name:10s} median step {t * 1e3:7.2f} ms  ratio {t / base:.4f}")
        for every in (1, 20, 100):
            expected = ((every - 1) * med["unmeasured"] + med["measured"]) / every
            print(f"  **overhead, measuring every {every}: {expected / base:.4f}**")
        runtime: dict[str, list[float]] = {"without": [], "every 20": []}
        if a.rounds:
            run_once(data, a.trainer_steps, None, Path(tmp) / "warm-up")
        for r in range(a.rounds):
            for name in runtime:
                every = 20 if name == "every 20" else None
                seconds = run_once(data, a.trainer_steps, every, Path(tmp) / f"{name}-{r}")
                runtime[name].append(seconds)
        if a.rounds:
            ratios = [v / w for v, w in zip(runtime["every 20"], runtime["without"], strict=True)]
            without, every20 = (statistics.median(runtime[k]) for k in runtime)
            spread = f"rounds {min(ratios):.4f}-{max(ratios):.4f}"
            print(f"HF Trainer, {a.trainer_steps} steps x {a.rounds} rounds: train_runtime "
                  f"without {without:.2f} s, every 20 {every20:.2f} s; ratio median "
                  f"{statistics.median(ratios):.4f} ({spread})")  # fmt: skip


if __name__ == "__main__":
    main()
