"""Peak bytes of live tensors while a function runs, on real tensors: what the memory plan predicts.

CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated at the start. CPU: the profiler's
allocation and free events summed in time order (exact and independent of allocator caching; memory
MKL or oneDNN allocate for themselves is not seen). Dead tensors are collected first, so that earlier
garbage cannot be freed inside the window.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterable, Iterator

import torch


@contextlib.contextmanager
def young_garbage() -> Iterator[None]:
    """Within the block ``gc.collect()`` scans only objects made in it: cheap, and earlier garbage is not
    freed inside a measurement."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def peak_tensor_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes of tensors ``fn()`` allocates on ``device`` above what is live when it starts."""
    return step_peaks([fn], device)[0]


def step_peaks(steps: Iterable[Callable[[], object]], device: torch.device | str = "cpu") -> list[int]:
    """The peak of live tensor bytes on ``device`` during each of ``steps``, run in turn, above what was
    live when the first started."""
    device = torch.device(device)
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"peak_tensor_bytes measures CUDA or CPU tensors, not {device.type!r}")
    with young_garbage():
        return _cuda_peaks(steps, device) if device.type == "cuda" else _cpu_peaks(steps)


def _cuda_peaks(steps: Iterable[Callable[[], object]], device: torch.device) -> list[int]:
    torch.cuda.empty_cache()
    torch.cuda.synchronize(device)
    start, peaks = torch.cuda.memory_allocated(device), []
    for step in steps:
        torch.cuda.reset_peak_memory_stats(device)
        step()
        gc.collect()
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - start)
    return peaks


def _cpu_peaks(steps: Iterable[Callable[[], object]]) -> list[int]:
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for index, step in enumerate(steps):
            with record_function(f"step {index}"):
                step()
                gc.collect()
    events = list(prof.profiler.kineto_results.events())
    ends = sorted(e.end_ns() for e in events if e.name().startswith("step "))
    memory = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    peaks, live, index = [0] * len(ends), 0, 0
    for event in memory:
        while index < len(ends) - 1 and event.start_ns() > ends[index]:
            index += 1
            peaks[index] = live  # what the step starts with
        live += event.nbytes()
        peaks[index] = max(peaks[index], live)
    for later in range(index + 1, len(ends)):  # steps that allocated nothing
        peaks[later] = live
    return peaks
