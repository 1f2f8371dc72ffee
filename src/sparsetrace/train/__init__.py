"""Training: the loop, checkpoints and run metadata."""
