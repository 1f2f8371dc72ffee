"""Hidden-unit use of pretrained and trained models: ``trace`` (Python) and ``analyze`` (CLI)."""

from importlib import import_module
from typing import Any

# Loaded on first use, so that the command line (which imports this package's verbs) starts
# without torch.
_EXPORTS = {
    "Trace": "sparsetrace.analysis.tracer",
    "trace": "sparsetrace.analysis.tracer",
    "ARCHITECTURES": "sparsetrace.sites",
    "Site": "sparsetrace.sites",
    "locate": "sparsetrace.sites",
    "select": "sparsetrace.sites",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sparsetrace.analysis' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
