"""sparsetrace: measure, trace and exploit activation sparsity in Transformer MLPs."""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # `sparsetrace.trace(model)`, `sparsetrace.Recorder(...)` without importing the torch-heavy
    # modules on every CLI call.
    if name == "trace":
        from sparsetrace.analysis import trace

        return trace
    if name == "Recorder":
        from sparsetrace.recording import Recorder

        return Recorder
    raise AttributeError(f"module 'sparsetrace' has no attribute {name!r}")
