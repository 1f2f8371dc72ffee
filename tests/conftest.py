"""Fixtures shared by the test modules."""

from __future__ import annotations

import gc
import hashlib
import os
import platform
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest


def _per_cpu_inductor_cache() -> None:
    """torch.compile's cache in this checkout, one directory per kind of CPU, unless one is set.
    The shared default (a temporary directory that outlives the machine on a disk that moves
    between hosts, and is shared by every clone and venv) served this suite's compiled model
    garbage use counts or an abort, twice; a fresh cache compiled the same test correctly."""
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return
    try:
        cpu = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        cpu = platform.processor()
    flags = sorted({line for line in cpu.splitlines() if line.startswith(("model name", "flags"))})
    key = hashlib.sha256("\n".join(flags).encode()).hexdigest()[:12]
    checkout = Path(__file__).resolve().parent.parent
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(checkout / ".pytest_cache" / f"inductor-{key}")


_per_cpu_inductor_cache()


@pytest.fixture
def model_loads(monkeypatch: pytest.MonkeyPatch) -> Callable[[], list[int]]:
    """Wraps ``sparsetrace.series.load_model`` (every Hugging Face revision loads through it);
    returns a function that gives, for each load so far, how many earlier models were still
    alive when it began (after a garbage collection): all zeros when one is held at a time."""
    import sparsetrace.series as model_series

    real, alive, loaded = model_series.load_model, [], []

    def load(*args, **kwargs):
        gc.collect()
        alive.append(sum(ref() is not None for ref in loaded))
        model = real(*args, **kwargs)
        loaded.append(weakref.ref(model))
        return model

    monkeypatch.setattr(model_series, "load_model", load)
    return lambda: list(alive)


@contextmanager
def _tiny_run(base: Path, *overrides: str) -> Iterator[Path]:
    """A run of the tiny preset named "r" in ``base`` (one thread) with ``overrides``
    (``--section.key value`` pairs); the token cache is ``base/cache``, set as SPARSETRACE_CACHE
    for the ``with`` block (the run's data and tokenizer are read from it)."""
    from sparsetrace.config import load_config
    from sparsetrace.train.loop import train

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARSETRACE_CACHE", str(base / "cache"))
        options = ["--out_dir", str(base), "--run_name", "r", "--train.threads", "1"]
        yield train(load_config("tiny", [*options, *overrides]))


@pytest.fixture(scope="session")
def tiny_run() -> Callable[..., AbstractContextManager[Path]]:
    """:func:`_tiny_run`, for module-scoped fixtures that train a run once."""
    return _tiny_run
