"""Hidden-unit use of pretrained and trained models: ``trace`` (Python) and ``analyze`` (CLI)."""

from sparsetrace.analysis.locate import ARCHITECTURES, Site, locate, select
from sparsetrace.analysis.tracer import Trace, trace

__all__ = ["ARCHITECTURES", "Site", "Trace", "locate", "select", "trace"]
