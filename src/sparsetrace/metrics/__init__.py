"""Pure metric functions: tensors in, numbers out."""

from sparsetrace.metrics.use import (
    DEFAULT_PERCENTILES,
    UseStats,
    rescaled_percentiles,
    use_counts,
    use_stats,
    use_stats_from_counts,
)

__all__ = [
    "DEFAULT_PERCENTILES",
    "UseStats",
    "rescaled_percentiles",
    "use_counts",
    "use_stats",
    "use_stats_from_counts",
]
