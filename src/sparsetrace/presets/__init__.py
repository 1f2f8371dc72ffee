"""Shipped YAML presets (read with importlib.resources)."""
