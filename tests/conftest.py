"""Test configuration: run Triton kernels through the interpreter when there is no GPU.

The interpreter is selected when ``@triton.jit`` runs, so the variable has to be set before any
kernel module (and ideally ``triton`` itself) is imported; conftest is imported before the tests.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Two cores: keep intra-op threads from oversubscribing; under pytest-xdist each worker (and every
# process a test starts) gets one thread, the workers sharing the cores.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a whole test module (``pytestmark = pytest.mark.usefixtures("one_thread")``).

    Tiny models on a shared 2-core machine: OpenMP spin contention otherwise makes each small matmul
    ~100× slower under load. Module scope, so that module fixtures (a reference run) and the tests that
    compare with them reduce in the same order: two runs compared step by step must, or Adam turns
    rounding-level gradient differences into differences of a whole step.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
