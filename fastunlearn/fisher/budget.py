"""The linear layers a Fisher estimate measures, by canonical name (the same on a model and on it wrapped
by ``peft``, DDP or DeepSpeed; for a ``peft`` adapter layer, its frozen base), and the memory budget of
their accumulators, one fp32 value per weight and data set (26 GB for Llama-2-7B): sizes in bytes, groups
of consecutive layers that fit a budget (the data is passed once per group), the default budget."""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from fastunlearn.engines.distributed import linear_shape
from fastunlearn.fisher.passes import Data, run_pass
from fastunlearn.models.naming import canonical_name, unwrap_model

_UNITS = {"": 1, "b": 1, **{p + "b": 10 ** (3 * i) for i, p in enumerate("kmgt", 1)}}
_UNITS |= {p + "ib": 2 ** (10 * i) for i, p in enumerate("kmgt", 1)}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")


def parse_bytes(value: int | str) -> int:
    """A size in bytes from an int or a string with an optional unit (decimal kB/MB/GB/TB, binary
    KiB/MiB/GiB/TiB, case-insensitive): ``65536``, ``"64MiB"``, ``"1.5 GiB"``; ``ValueError`` for
    anything else and for sizes below one byte."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"a memory size must be an int or a string like '64MiB', got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.fullmatch(value)
        unit = match.group(2).lower() if match else None
        if unit not in _UNITS:
            raise ValueError(
                f"invalid memory size {value!r}: expected bytes as an integer or a number with a unit "
                "(kB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. '64MiB' or '2GB'"
            )
        size = math.floor(float(match.group(1)) * _UNITS[unit])
    if size < 1:
        raise ValueError(f"a memory size must be at least one byte, got {value!r}")
    return size


def format_bytes(size: float) -> str:
    """``size`` in the largest binary unit that keeps it at least 1 (``'64.0 MiB'``)."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{int(size)} B"


FILA_ACCUMULATORS = "fp32 forget and retain accumulators"


def accumulator_bytes(layers: Mapping[str, nn.Module], sets: int) -> dict[str, int]:
    """Bytes of each layer's fp32 Fisher accumulators, one per data set (FILA's: forget and retain)."""
    return {name: 4 * sets * math.prod(linear_shape(layer)) for name, layer in layers.items()}


def plan_groups(
    sizes: Mapping[str, int], budget: int, *, what: str, origin: str = "the Fisher memory budget"
) -> list[list[str]]:
    """Split layers (name → accumulator bytes, in the model's order) into the fewest runs of consecutive
    layers whose bytes fit ``budget`` (greedy). ``what`` (what a layer's bytes are) and ``origin``
    (where the budget came from) word the ``ValueError`` for a layer that alone exceeds it."""
    budget = max(budget, 0)
    largest = max(sizes, key=sizes.__getitem__, default=None)
    if largest is not None and sizes[largest] > budget:  # the largest layer decides the least budget
        need = sizes[largest]
        raise ValueError(
            f"{origin}, {format_bytes(budget)} ({budget} bytes), is too small for layer {largest!r}: its "
            f"{what} need {format_bytes(need)} ({need} bytes), the most of any layer; give at least that "
            "(max_memory=, --fisher-memory)"
        )
    groups: list[list[str]] = []
    used = budget + 1  # forces a new group for the first layer
    for name, size in sizes.items():
        if used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


def available_memory(device: torch.device) -> int:
    """Bytes that tensors on ``device`` could still take: for CUDA the driver's free memory plus what
    PyTorch's caching allocator holds unused; for the CPU the host's ``MemAvailable`` (free pages where
    there is no ``/proc/meminfo``)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as info:
            return next(int(line.split()[1]) * 1024 for line in info if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def resolve_budget(
    max_memory: int | None,
    model: nn.Module,
    data: Sequence[Data],
    layers: Mapping[str, nn.Linear],
    *,
    mode: str,
    backend: str,
    cpu_default: Callable[[], int],
) -> tuple[int, str]:
    """The accumulator budget in bytes and where it came from (for error messages): ``max_memory`` when
    given; on CUDA 90 % of the available memory less the activation peak of one dry pass over the
    largest batch, less one fp32 layer of scratch for the fold; on the CPU, ``cpu_default()``. Call
    inside :func:`~fastunlearn.fisher.passes.fisher_session`."""
    if max_memory is not None:
        return max_memory, "the Fisher memory budget (max_memory)"
    device = next(iter(layers.values())).weight.device
    if device.type != "cuda":
        return cpu_default(), "the default Fisher memory budget (part of the available host memory)"
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    batch = max((b for d in data for b in d.batches), key=lambda b: b.labels.numel())
    largest = Data([batch], batch.examples, batch.tokens)  # the batch with the most token positions
    run_pass(model, largest, layers, mode=mode, backend=backend, fold=False)
    torch.cuda.synchronize(device)
    activations = torch.cuda.max_memory_allocated(device) - before
    scratch = 4 * max(math.prod(linear_shape(layer)) for layer in layers.values())
    budget = int(0.9 * (available_memory(device) - activations)) - scratch
    origin = (
        f"the default Fisher memory budget (free {device} memory after the model and "
        f"{format_bytes(activations)} of activations)"
    )
    return budget, origin


def _tuner_layer_class() -> type | None:
    # A model can only hold peft layers if peft has been imported.
    if "peft" not in sys.modules:
        return None
    from peft.tuners.tuners_utils import BaseTunerLayer

    return BaseTunerLayer


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of ``model`` by canonical name; for a ``peft`` adapter layer its frozen base,
    not the adapters' own layers."""
    root = unwrap_model(model)
    tuner = _tuner_layer_class()
    found: dict[str, nn.Linear] = {}
    skip = None  # named_modules is pre-order: a tuner layer's submodules follow it directly
    for name, module in root.named_modules():
        if skip is not None and name.startswith(skip):
            continue
        skip = None
        if tuner is not None and isinstance(module, tuner):
            skip = name + "."
            base = module.get_base_layer()
            if isinstance(base, nn.Linear):
                found[canonical_name(name)] = base
        elif isinstance(module, nn.Linear):
            found[canonical_name(name)] = module
    return found


def select_linear_layers(
    model: nn.Module, target_modules: str | Sequence[str] | None
) -> dict[str, nn.Linear]:
    """Resolve ``target_modules`` (canonical names or dotted suffixes) to linear layers; ``None``: every
    ``nn.Linear`` but the output embedding. ``ValueError`` naming an entry that matches nothing."""
    layers = linear_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layers to measure")
    if target_modules is None:
        get_out = getattr(unwrap_model(model), "get_output_embeddings", None)
        head = get_out() if callable(get_out) else None
        tuner = _tuner_layer_class()
        if tuner is not None and isinstance(head, tuner):
            head = head.get_base_layer()
        selected = {name: layer for name, layer in layers.items() if layer is not head}
        if not selected:
            raise ValueError("the model's only linear layer is its output embedding; name it explicitly")
        return selected
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    selected = {}
    for spec in target_modules:
        if not isinstance(spec, str) or not spec:
            raise TypeError(f"target_modules entries must be non-empty strings, got {spec!r}")
        key = canonical_name(spec)
        matched = {n: m for n, m in layers.items() if n == key or n.endswith("." + key)}
        if not matched:
            names = sorted(layers)
            shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
            raise ValueError(
                f"target module {spec!r} matches no linear layer of the model; layer types "
                f"{sorted({n.rsplit('.', 1)[-1] for n in names})}; layers: {shown}"
            )
        selected.update(matched)
    return selected
