"""The decoder-only Transformer (one readable file: transformer.py)."""
