"""Deterministic, resumable batch selection over packed token streams."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from sparsetrace.errors import UserError


def n_windows(n_tokens: int, seq_len: int) -> int:
    """Sequences of seq_len+1 tokens in a stream; windows step by seq_len, sharing one token."""
    return max(0, (n_tokens - 1) // seq_len)


@lru_cache(maxsize=4)
def _epoch_permutation(n_sequences: int, seed: int, epoch: int) -> np.ndarray:
    # seeded by (seed, epoch) alone: any step's batch is computable without replaying the others
    perm = np.random.default_rng([seed, epoch]).permutation(n_sequences)
    perm.flags.writeable = False  # shared through the cache
    return perm


def batch_indices(
    n_sequences: int, step: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
) -> np.ndarray:
    """Sequence indices of `rank`'s share of global batch `step`.

    Global position g (step*batch_size*world_size + rank*batch_size + i) maps to epoch
    g // n_sequences and index perm(seed, epoch)[g % n_sequences]; a pure function of its
    arguments, so resuming at step k reproduces the same batches.
    """
    if n_sequences < 1:
        raise UserError(f"no sequences to draw batches from (n_sequences={n_sequences})")
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise UserError(
            f"bad batch layout: batch_size={batch_size}, rank={rank}, world_size={world_size}"
        )
    if step < 0 or seed < 0:
        raise UserError(f"step and seed must be >= 0, got step={step}, seed={seed}")
    start = (step * world_size + rank) * batch_size
    positions = np.arange(start, start + batch_size, dtype=np.int64)
    epochs, offsets = np.divmod(positions, n_sequences)
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):  # at most a few epochs per batch
        sel = epochs == epoch
        out[sel] = _epoch_permutation(n_sequences, seed, int(epoch))[offsets[sel]]
    return out


def get_batch(tokens: np.ndarray, indices: np.ndarray, seq_len: int) -> torch.Tensor:
    """Rows tokens[i*seq_len : i*seq_len+seq_len+1] for each index i, as a LongTensor."""
    idx = np.asarray(indices, dtype=np.int64)
    n = n_windows(len(tokens), seq_len)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"sequence index out of range [0, {n}): {idx.min()}..{idx.max()}")
    # fancy indexing on a memmap reads only the pages these windows touch
    rows = tokens[idx[:, None] * seq_len + np.arange(seq_len + 1)]
    return torch.from_numpy(rows.astype(np.int64))


def epochs_for(n_sequences: int, steps: int, global_batch: int) -> float:
    """Passes over the data that `steps` batches of `global_batch` sequences make."""
    if n_sequences < 1:
        raise UserError(f"no sequences to train on (n_sequences={n_sequences})")
    return steps * global_batch / n_sequences


class Windows(torch.utils.data.Dataset):
    """The packed stream as a map-style dataset of causal-LM examples, for other trainers
    (Hugging Face ``Trainer``, Lightning): example i is ``{"input_ids": w, "labels": w}`` with
    w the i-th window of ``seq_len`` tokens (the model shifts the labels itself)."""

    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return len(self.tokens) // self.seq_len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range [0, {len(self)})")
        ids = torch.from_numpy(
            self.tokens[i * self.seq_len : (i + 1) * self.seq_len].astype(np.int64)
        )
        return {"input_ids": ids, "labels": ids}
