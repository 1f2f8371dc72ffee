"""Corpus sources, tokenizers and packed token caches."""
