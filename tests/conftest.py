"""Test configuration: run Triton kernels through the interpreter when there is no GPU.

The interpreter is selected when ``@triton.jit`` runs, so the variable has to be set before any
kernel module (and ideally ``triton`` itself) is imported; conftest is imported before the tests.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Two cores: keep intra-op threads from oversubscribing when pytest-xdist is not used.
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
