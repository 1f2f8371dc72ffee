"""Lifecycle tracker (Table 2, sections 4.1-4.2) against a naive per-unit simulation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsetrace.tracking.lifecycle import LifecycleTracker

History = list[tuple[int, dict[str, np.ndarray]]]


def naive_layer(history: list[tuple[int, np.ndarray]]) -> dict[str, object]:
    """Table 2 quantities of one layer from its (step, per-batch use mask) history, unit by unit."""
    steps = [step for step, _ in history]
    masks = [mask for _, mask in history]
    hidden = len(masks[0])
    first_step = [-1] * hidden
    last_step = [-1] * hidden
    counts = {"on_first_batch": 0, "turned_on": 0, "turned_off": 0, "final_use": 0, "never_used": 0}
    for h in range(hidden):
        col = [bool(m[h]) for m in masks]
        used_at = [s for s, on in zip(steps, col, strict=True) if on]
        if used_at:
            first_step[h], last_step[h] = used_at[0], used_at[-1]
        counts["on_first_batch"] += col[0]
        counts["turned_on"] += (not col[0]) and col[-1]
        counts["turned_off"] += col[0] and not col[-1]
        counts["final_use"] += col[-1]
        counts["never_used"] += not col[0] and not col[-1]  # Table 2: 100 - first - turned on
    transitions = []
    for t, (step, mask) in enumerate(history):
        prev = mask if t == 0 else masks[t - 1]
        off = sum(1 for h in range(hidden) if prev[h] and not mask[h])
        on = sum(1 for h in range(hidden) if not prev[h] and mask[h])
        transitions.append((step, int(sum(bool(v) for v in mask)), off, on))
    return {
        "summary": {k: v / hidden for k, v in counts.items()},
        "first_step_used": first_step,
        "last_step_used": last_step,
        "transitions": transitions,
        "ever_used": [s >= 0 for s in first_step],
        "first_used": [bool(v) for v in masks[0]],
        "latest_used": [bool(v) for v in masks[-1]],
    }


def naive(history: History) -> dict[str, dict[str, object]]:
    per_layer: dict[str, list[tuple[int, np.ndarray]]] = {}
    for step, batch in history:
        for name, mask in batch.items():
            per_layer.setdefault(name, []).append((step, mask))
    return {name: naive_layer(h) for name, h in per_layer.items()}


def feed(tracker: LifecycleTracker, history: History) -> None:
    for step, batch in history:
        tracker.update(step, {name: torch.from_numpy(m) for name, m in batch.items()})


def tracker_view(tracker: LifecycleTracker) -> dict[str, dict[str, object]]:
    """The tracker's state in :func:`naive_layer`'s layout."""
    summary = tracker.summary()
    return {
        name: {
            "summary": summary[name],
            "first_step_used": lc.first_step_used.tolist(),
            "last_step_used": lc.last_step_used.tolist(),
            "transitions": list(lc.transitions),
            "ever_used": lc.ever_used.tolist(),
            "first_used": lc.first_used.tolist(),
            "latest_used": lc.latest_used.tolist(),
        }
        for name, lc in tracker.layers.items()
    }


@st.composite
def histories(draw: st.DrawFn) -> History:
    """Random measured steps (increasing, with gaps) of two layers plus one that joins late.

    Each unit has its own on-probability that drifts over time, so units turn on and off."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n_steps = draw(st.integers(1, 12))
    steps = np.cumsum(rng.integers(1, 50, n_steps)).tolist()
    hiddens = {"a": draw(st.integers(1, 30)), "b": draw(st.integers(1, 30)), "c": 7}
    start = {name: rng.uniform(0, 1, h) for name, h in hiddens.items()}
    end = {name: rng.choice([0.0, 0.3, 1.0], h) for name, h in hiddens.items()}
    joins = draw(st.integers(0, n_steps))  # layer "c" appears from this step on (maybe never)
    history: History = []
    for t, step in enumerate(steps):
        w = t / max(n_steps - 1, 1)
        batch = {
            name: rng.random(h) < (1 - w) * start[name] + w * end[name]
            for name, h in hiddens.items()
            if name != "c" or t >= joins
        }
        history.append((int(step), batch))
    return history


@settings(max_examples=150, deadline=None)
@given(histories())
def test_tracker_matches_naive_simulation(history: History) -> None:
    tracker = LifecycleTracker()
    feed(tracker, history)
    assert tracker_view(tracker) == naive(history)


def test_hand_case() -> None:
    # Units 0..4 over steps 10, 20, 30:
    #   unit 0: on  on  on   -> on first batch, final use
    #   unit 1: on  off off  -> turned off (first 10, last 10)
    #   unit 2: off on  on   -> turned on (first 20, last 30)
    #   unit 3: off off off  -> never used
    #   unit 4: off on  off  -> used in between only: neither turned on nor off; never used by
    #                           Table 2's arithmetic (off at the first and at the last batch)
    masks = [[1, 1, 0, 0, 0], [1, 0, 1, 0, 1], [1, 0, 1, 0, 0]]
    tracker = LifecycleTracker()
    for step, m in zip((10, 20, 30), masks, strict=True):
        tracker.update(step, {"layer": torch.tensor(m, dtype=torch.bool)})
    assert tracker.summary()["layer"] == {
        "on_first_batch": 2 / 5,
        "turned_on": 1 / 5,
        "turned_off": 1 / 5,
        "final_use": 2 / 5,
        "never_used": 2 / 5,
    }
    # Table 2 adds up: never used = 100 % - on at batch 0 - turned on.
    summary = tracker.summary()["layer"]
    assert summary["never_used"] == pytest.approx(
        1 - summary["on_first_batch"] - summary["turned_on"]
    )
    lc = tracker.layers["layer"]
    assert lc.first_step_used.tolist() == [10, 10, 20, -1, 20]
    assert lc.last_step_used.tolist() == [30, 10, 30, -1, 20]
    # (step, units on, switched off since previous, switched on since previous)
    assert lc.transitions == [(10, 2, 0, 0), (20, 3, 1, 2), (30, 2, 1, 0)]


def test_accepts_non_bool_masks_and_keeps_no_reference_to_them() -> None:
    tracker = LifecycleTracker()
    mask = torch.tensor([1.0, 0.0, 2.0])  # nonzero = on, e.g. a count per unit
    tracker.update(0, {"layer": mask})
    first = torch.tensor([True, False, True])
    mask_b = first.clone()
    tracker.update(1, {"layer": mask_b})
    mask_b.zero_()  # the caller reuses its buffer
    lc = tracker.layers["layer"]
    assert lc.first_used.tolist() == first.tolist()
    assert lc.latest_used.tolist() == first.tolist()
    assert lc.ever_used.tolist() == first.tolist()


def fixed_history(seed: int, n_steps: int = 10) -> History:
    rng = np.random.default_rng(seed)
    history: History = []
    for t in range(n_steps):
        p = 0.8 - 0.07 * t
        history.append((5 * t, {"a": rng.random(16) < p, "b": rng.random(9) < 1 - p}))
    return history


@pytest.mark.parametrize("split", [1, 4, 9])
def test_state_dict_round_trip_through_torch_save(tmp_path: Path, split: int) -> None:
    history = fixed_history(seed=split)
    original = LifecycleTracker()
    feed(original, history[:split])
    path = tmp_path / "tracker.pt"
    torch.save(original.state_dict(), path)
    restored = LifecycleTracker()
    restored.load_state_dict(torch.load(path))
    assert tracker_view(restored) == tracker_view(original)
    feed(original, history[split:])
    feed(restored, history[split:])
    assert tracker_view(restored) == tracker_view(original) == naive(history)


def test_in_memory_state_dict_is_a_snapshot() -> None:
    """A state dict kept in memory (not saved yet) must not change as training goes on."""
    history = fixed_history(seed=3)
    original = LifecycleTracker()
    feed(original, history[:3])
    state = original.state_dict()
    at_snapshot = tracker_view(original)
    feed(original, history[3:])
    restored = LifecycleTracker()
    restored.load_state_dict(state)
    assert tracker_view(restored) == at_snapshot
    feed(restored, history[3:])
    assert tracker_view(restored) == tracker_view(original)


def test_mismatched_hidden_size_raises() -> None:
    tracker = LifecycleTracker()
    tracker.update(0, {"layer": torch.ones(8, dtype=torch.bool)})
    with pytest.raises(ValueError, match="8"):
        tracker.update(1, {"layer": torch.ones(9, dtype=torch.bool)})
