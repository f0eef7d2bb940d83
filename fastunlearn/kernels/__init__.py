"""Triton kernels and their host-side launchers.

Each module holds the ``@triton.jit`` functions and a launcher that allocates outputs and picks the
grid; nothing here knows about autograd. Importing a submodule imports ``triton``; this package itself
imports nothing, so ``import fastunlearn`` works on machines without Triton or a GPU.
"""
