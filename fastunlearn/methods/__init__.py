"""Unlearning objectives: a forget term and a retain term computed by the patched model."""
