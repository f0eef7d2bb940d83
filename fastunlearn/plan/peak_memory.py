"""Peak bytes of live tensors while a function runs: what :mod:`fastunlearn.plan.memory_plan` predicts.

One definition for the benchmarks (benchmarks/bench_scale.py and the others) and the plan's tests.

- CUDA: the caching allocator's counters, ``torch.cuda.max_memory_allocated`` above what was
  allocated when ``fn`` started (after a synchronisation on both sides).
- CPU: the PyTorch profiler's allocation and free events (``profile_memory=True``), summed in time
  order — the live bytes of every tensor PyTorch's CPU allocator hands out, exact and independent of
  allocator caching. It does not see memory that MKL or oneDNN allocate for themselves (matmul
  packing buffers), nor Python objects. The process's resident set is no substitute: it moved by
  tens of MB between identical runs of a few-hundred-MB step.

Dead tensors are collected (``gc.collect``; on CUDA the cache emptied) before the measurement, so
garbage from earlier code cannot be freed inside the window and lower the figure.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch

__all__ = ["peak_tensor_bytes"]


def peak_tensor_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes of tensors ``fn()`` allocates on ``device`` above what is live when it starts."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if device.type != "cpu":
        raise ValueError(f"peak_tensor_bytes measures CUDA or CPU tensors, not {device.type!r}")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak
