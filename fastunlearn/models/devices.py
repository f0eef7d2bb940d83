"""Devices and precision: where a model is, the device training runs on, a device named by the user,
PyTorch's threads, and training precision that cannot silently degrade (what ``precision`` resolves to
on a device, the dtype a model given by path loads in, the weights refused).

bf16 and fp16 are autocast over fp32 trained weights (AdamW's updates are often below bf16's 2⁻⁸
resolution; fp16's loss scaling, CUDA only, needs fp32 weights); a frozen base may load in bf16.
Model objects keep their dtype: fp16 weights are refused, bf16 weights need bf16 and an adapter.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"fp32"``, ``"bf16"`` or ``"fp16"``: the compute precision ``precision`` means on ``device``.

    ``"auto"``: bf16 on CUDA sm_80+ (native bf16 matmuls), else fp32; on CPUs without AVX512-BF16 or AMX
    bf16 is emulated and slower, so there it is only on request. ``"bf16"`` is refused on older GPUs.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {list(PRECISIONS)}")
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        bf16_native = capability >= (8, 0)
    else:
        capability, bf16_native = None, device.type == "cpu"
    if precision == "auto":
        return "bf16" if device.type == "cuda" and bf16_native else "fp32"
    if precision == "bf16" and not bf16_native:
        where = f"this GPU is sm_{capability[0]}{capability[1]}" if capability else f"not on {device.type}"
        raise ValueError(
            f"precision 'bf16' needs a CUDA GPU of compute capability 8.0+ (Ampere or newer) or the CPU; "
            f"{where}: use 'fp16' (loss-scaled) or 'fp32'"
        )
    return precision


def weights_dtype(model: nn.Module) -> torch.dtype:
    """The lowest-precision floating dtype among ``model``'s parameters (fp16 before bf16 before the
    rest; fp32 for a model without floating parameters)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    for low in (torch.float16, torch.bfloat16):
        if low in dtypes:
            return low
    return min(dtypes, key=lambda d: torch.finfo(d).bits, default=torch.float32)


def resolve_training_precision(
    precision: str, device: torch.device, *, init: str, weights: torch.dtype | None = None
) -> str:
    """The precision of training on ``device``, or a ``ValueError`` saying why the request cannot be
    honoured. ``weights``: a model object's (:func:`weights_dtype`); ``None`` for a model given by path."""
    if weights == torch.float16:
        raise ValueError(
            "the model's weights are fp16: their gradients would flush to zero without loss scaling, and "
            "loss scaling needs fp32 weights; pass the model in fp32 (precision='fp16' trains it under "
            "fp16 autocast with loss scaling) or in bf16"
        )
    if weights == torch.bfloat16:
        if init == "full":
            raise ValueError(
                "init='full' trains the model's own weights, which are bf16: AdamW's updates below bf16's "
                "resolution (2^-8 of a weight) would be lost; pass the model in fp32 (precision='bf16' "
                "still computes in bf16)"
            )
        if precision not in ("auto", "bf16"):
            raise ValueError(
                f"precision {precision!r} but the model's weights are bf16, so it computes in bf16; pass "
                "precision='bf16' (or 'auto'), or the model in fp32"
            )
        precision = "bf16"
    resolved = resolve_precision(precision, device)
    if resolved == "fp16" and device.type != "cuda":
        raise ValueError(
            f"precision 'fp16' needs loss scaling, which the training loop applies on CUDA GPUs only (on "
            f"{device.type} fp16 would run unscaled, its small gradients flushed to zero); use 'bf16' or "
            "'fp32'"
        )
    return resolved


def load_dtype(precision: str, init: str) -> torch.dtype:
    """The dtype a model given by path loads in: bf16 for a frozen base under bf16, else fp32."""
    return torch.bfloat16 if precision == "bf16" and init != "full" else torch.float32


@contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """The autocast ``Trainer`` trains under, for computations that must match a training step."""
    dtype = PRECISION_DTYPES[precision]
    with torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32"):
        yield


class AutocastEachCall(nn.Module):
    """``module`` under the run's autocast on ``device``, a region per call as accelerate wraps
    ``Trainer``'s model."""

    def __init__(self, module: nn.Module, precision: str, device: torch.device) -> None:
        super().__init__()
        self.module, self.precision, self.compute_device = module, precision, device

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with autocast(self.precision, self.compute_device):
            return self.module(*args, **kwargs)
