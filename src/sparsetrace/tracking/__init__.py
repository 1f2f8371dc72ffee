"""Stateful trackers fed over training."""

from sparsetrace.tracking.lifecycle import LayerLifecycle, LifecycleTracker

__all__ = ["LayerLifecycle", "LifecycleTracker"]
