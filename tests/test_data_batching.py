"""Batch selection: determinism, epoch coverage, rank layout, and packed windows."""

import numpy as np
import pytest
import torch

from sparsetrace.data import batch_indices, epochs_for, get_batch
from sparsetrace.data.batching import n_windows
from sparsetrace.errors import UserError


def test_batch_indices_deterministic_and_seeded():
    a = batch_indices(1000, step=7, batch_size=16, seed=3)
    b = batch_indices(1000, step=7, batch_size=16, seed=3)
    c = batch_indices(1000, step=7, batch_size=16, seed=4)
    assert a.dtype == np.int64 and a.shape == (16,)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_resume_reproduces_batches():
    # a fresh call at step k (as after a restart) equals step k of an uninterrupted run
    run = [batch_indices(50, s, 8, seed=1) for s in range(20)]
    for k in (0, 6, 13, 19):
        assert np.array_equal(batch_indices(50, k, 8, seed=1), run[k])


def test_one_epoch_has_no_repeats_across_steps_and_ranks():
    n, bs, world = 120, 5, 3
    seen = [
        batch_indices(n, step, bs, seed=0, rank=r, world_size=world)
        for step in range(n // (bs * world))
        for r in range(world)
    ]
    assert sorted(np.concatenate(seen).tolist()) == list(range(n))


def test_ranks_split_the_same_global_batch():
    # n=37, global batch 8: step 9 (positions 72..79) straddles the epoch boundary at 74
    for step in (0, 1, 3, 9):
        ranks = [batch_indices(37, step, 4, seed=5, rank=r, world_size=2) for r in range(2)]
        single = batch_indices(37, step, 8, seed=5)
        assert np.array_equal(np.concatenate(ranks), single)
        if step != 9:  # within one epoch the ranks' sequences are disjoint
            assert not set(ranks[0]) & set(ranks[1])


def test_epoch_wrap_uses_a_fresh_permutation():
    n = 10
    # batch 4: step 2 holds positions 8..11, i.e. the end of epoch 0 and the start of epoch 1
    flat = np.concatenate([batch_indices(n, s, 4, seed=2) for s in range(5)])
    epoch0, epoch1 = flat[:10], flat[10:]
    assert sorted(epoch0.tolist()) == list(range(n))
    assert sorted(epoch1.tolist()) == list(range(n))
    assert not np.array_equal(epoch0, epoch1)
    assert np.array_equal(batch_indices(n, 2, 4, seed=2), np.r_[epoch0[8:], epoch1[:2]])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_sequences": 0},
        {"batch_size": 0},
        {"rank": 2, "world_size": 2},
        {"step": -1},
        {"seed": -1},
    ],
)
def test_batch_indices_rejects_bad_arguments(kwargs):
    args = {"n_sequences": 10, "step": 0, "batch_size": 2, "seed": 0} | kwargs
    with pytest.raises(UserError):
        batch_indices(**args)


@pytest.mark.parametrize(
    ("n_tokens", "seq_len", "expected"),
    [(0, 4, 0), (4, 4, 0), (5, 4, 1), (8, 4, 1), (9, 4, 2), (1001, 10, 100)],
)
def test_n_windows(n_tokens, seq_len, expected):
    assert n_windows(n_tokens, seq_len) == expected


def test_get_batch_matches_naive_slices(tmp_path):
    seq_len = 6
    data = np.arange(3 * 1000, dtype=np.uint16) % 997
    path = tmp_path / "t.bin"
    data.tofile(path)
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    n = n_windows(len(tokens), seq_len)
    indices = np.array([0, n - 1, 17, 17, 250])
    batch = get_batch(tokens, indices, seq_len)
    assert batch.dtype == torch.int64 and batch.shape == (5, seq_len + 1)
    for row, i in zip(batch, indices, strict=True):
        assert row.tolist() == data[i * seq_len : i * seq_len + seq_len + 1].tolist()
    # consecutive windows share one token: the target of one is the input of the next
    assert (
        get_batch(tokens, np.array([3]), seq_len)[0, -1]
        == get_batch(tokens, np.array([4]), seq_len)[0, 0]
    )


def test_get_batch_rejects_out_of_range():
    tokens = np.arange(20, dtype=np.uint16)
    with pytest.raises(IndexError):
        get_batch(tokens, np.array([n_windows(20, 4)]), 4)


def test_epochs_for():
    assert epochs_for(100, steps=50, global_batch=4) == 2.0
    assert epochs_for(1000, steps=10, global_batch=25) == 0.25
    with pytest.raises(UserError):
        epochs_for(0, 1, 1)


def test_windows_dataset_is_consecutive_windows_by_hand() -> None:
    from sparsetrace.data import Windows

    ds = Windows(np.arange(10, dtype=np.uint16), 3)
    assert len(ds) == 3  # [0 1 2] [3 4 5] [6 7 8]; token 9 is left over
    assert ds[1]["input_ids"].tolist() == [3, 4, 5] == ds[1]["labels"].tolist()
    assert ds[2]["input_ids"].dtype == torch.int64
    with pytest.raises(IndexError):
        ds[3]
