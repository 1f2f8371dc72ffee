"""Corpus sources, tokenizers and packed token caches."""

from sparsetrace.data.batching import Windows, batch_indices, epochs_for, get_batch
from sparsetrace.data.config import DataConfig
from sparsetrace.data.prepare import PreparedData, prepare_data

__all__ = [
    "DataConfig",
    "PreparedData",
    "Windows",
    "batch_indices",
    "epochs_for",
    "get_batch",
    "prepare_data",
]
