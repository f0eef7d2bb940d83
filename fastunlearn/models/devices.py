"""Where a model is, the device training runs on, a device named by the user, and PyTorch's threads."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (the CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def training_device() -> torch.device:
    """The device ``Trainer`` trains on in this process: its local GPU, or the CPU without CUDA."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def to_training_device(model: nn.Module) -> None:
    """Move a CPU model to the GPU ``Trainer`` will use (so the passes before training run there too);
    models dispatched with a ``device_map`` and runs without CUDA stay where they are."""
    on_cpu = model_device(model).type == "cpu"
    if torch.cuda.is_available() and on_cpu and getattr(model, "hf_device_map", None) is None:
        model.to(training_device())


def resolve_device(name: str) -> torch.device:
    """The device ``name`` asks for (``"auto"``: CUDA when available, else the CPU); ``ValueError``
    for a malformed name or a CUDA device that is not there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; expected cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise ValueError(f"device {name!r}: this PyTorch build has no CUDA support (a CPU build)")
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


@contextmanager
def num_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` PyTorch intra-op threads (``None``: unchanged): on a small model or
    a busy machine, OpenMP threads spin-waiting for a core can make a CPU run many times slower."""
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode with gradients off, and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
