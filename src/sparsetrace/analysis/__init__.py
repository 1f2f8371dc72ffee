"""Hidden-unit use of pretrained and trained models: ``trace`` (Python) and ``analyze`` (CLI)."""

from sparsetrace.analysis.tracer import Trace, trace
from sparsetrace.sites import ARCHITECTURES, Site, locate, select

__all__ = ["ARCHITECTURES", "Site", "Trace", "locate", "select", "trace"]
