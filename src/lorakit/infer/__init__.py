"""Inference: generation (with or without an adapter) and merging."""
