"""Sparsity turned into speed: sparse MLP execution for decoding, and its measurement against
the machine's memory bandwidth (``sparsetrace speed``; docs/speed.md)."""
