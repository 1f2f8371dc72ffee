"""Trace sparsity over training inside a Hugging Face Trainer: one line, attach(trainer).

    python examples/hf_trainer.py [OUT]           # ~1 minute here; default OUT: runs/example-hf
    sparsetrace report OUT/sparsetrace            # Tables 1-3, Figures 1-2 of the paper

A tiny GPT-2 with ReLU MLPs (4 layers, d_model 128, d_ff 1024), random init, trained on the
embedded Shakespeare corpus with sparsetrace's tokenizer. Per-layer use also goes to the
Trainer's own logging (here TensorBoard under OUT/runs), like its loss.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from sparsetrace.config import load_config
from sparsetrace.data import Windows, prepare_data
from sparsetrace.integrations.huggingface import attach
from sparsetrace.report import write_report


def main(out: Path) -> None:
    data = prepare_data(load_config("cpu").data)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_embd=128, n_head=4, n_inner=1024, vocab_size=data.vocab_size,
                        n_positions=data.seq_len, activation_function="relu")  # fmt: skip
    model = GPT2LMHeadModel(config)
    args = TrainingArguments(
        output_dir=str(out), max_steps=150, per_device_train_batch_size=16, learning_rate=3e-3,
        warmup_steps=15, lr_scheduler_type="constant_with_warmup", logging_steps=15,
        eval_strategy="steps", eval_steps=75, per_device_eval_batch_size=16,
        save_strategy="no", report_to=["tensorboard"], use_cpu=True, seed=0, disable_tqdm=True,
    )  # fmt: skip
    val = torch.utils.data.Subset(Windows(data.val, data.seq_len), range(64))
    trainer = Trainer(model=model, args=args, train_dataset=Windows(data.train, data.seq_len),
                      eval_dataset=val)  # fmt: skip
    attach(trainer, every=10)  # the one line: writes OUT/sparsetrace, a sparsetrace run directory
    trainer.train()
    index = write_report([out / "sparsetrace"], out / "report")
    print(f"run directory: {out / 'sparsetrace'}\nreport: {index}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/example-hf"))
