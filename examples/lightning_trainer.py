"""Trace sparsity over training inside a Lightning Trainer: one callback.

    python examples/lightning_trainer.py [OUT]    # ~1 minute; default OUT: runs/example-lightning
    sparsetrace report OUT/sparsetrace            # Tables 1-3, Figures 1-2 of the paper

sparsetrace's `cpu` model (6 ReLU layers, d_ff 2048) inside a LightningModule, on the embedded
Shakespeare corpus. Per-layer use also goes to the Trainer's loggers (here CSV under OUT/logs).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from sparsetrace.config import load_config
from sparsetrace.data import batch_indices, get_batch, prepare_data
from sparsetrace.data.batching import n_windows
from sparsetrace.integrations.lightning import SparsityCallback
from sparsetrace.model.transformer import Transformer
from sparsetrace.report import write_report

STEPS, WARMUP, LR = 120, 12, 3e-3


class LanguageModel(pl.LightningModule):
    def __init__(self, cfg, vocab_size: int, seq_len: int) -> None:
        super().__init__()
        self.model = Transformer(cfg.model.with_data(vocab_size, seq_len))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.model(batch[:, :-1], batch[:, 1:]).loss
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val_loss", self.model(batch[:, :-1], batch[:, 1:]).loss)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
        warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / WARMUP))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


class Batches(torch.utils.data.Dataset):
    """sparsetrace's own batches: step i is the same global batch as in `sparsetrace train`."""

    def __init__(self, tokens, seq_len: int, batch: int, steps: int) -> None:
        self.tokens, self.seq_len, self.batch, self.steps = tokens, seq_len, batch, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> torch.Tensor:
        n = n_windows(len(self.tokens), self.seq_len)
        return get_batch(self.tokens, batch_indices(n, step, self.batch, seed=0), self.seq_len)


def main(out: Path) -> None:
    cfg = load_config("cpu")
    data = prepare_data(cfg.data)
    torch.manual_seed(0)
    module = LanguageModel(cfg, data.vocab_size, data.seq_len)
    train = Batches(data.train, data.seq_len, cfg.train.batch_size, STEPS)
    val = Batches(data.val, data.seq_len, cfg.train.batch_size, 4)
    trainer = pl.Trainer(
        default_root_dir=str(out), max_steps=STEPS, accelerator="cpu", devices=1,
        val_check_interval=60, logger=pl.loggers.CSVLogger(out / "logs"), log_every_n_steps=20,
        enable_checkpointing=False, enable_progress_bar=False,
        callbacks=[SparsityCallback(every=10, warmup_steps=WARMUP)],  # the one line
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(train, batch_size=None),
                torch.utils.data.DataLoader(val, batch_size=None))  # fmt: skip
    index = write_report([out / "sparsetrace"], out / "report")
    print(f"run directory: {out / 'sparsetrace'}\nreport: {index}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/example-lightning"))
