"""sparsetrace: measure, trace and exploit activation sparsity in Transformer MLPs."""

__version__ = "0.1.0"
