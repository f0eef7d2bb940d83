"""Triton kernels and their host-side launchers; no autograd. Importing a submodule imports ``triton``,
this package itself nothing, so ``import fastunlearn`` works without Triton or a GPU."""
