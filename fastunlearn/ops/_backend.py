"""Backend selection shared by every fused operation.

``"auto"`` sends CUDA tensors to Triton and everything else to the chunked PyTorch path. ``"triton"``
on CPU tensors runs the kernels under the Triton interpreter, which must be switched on
(``TRITON_INTERPRET=1``) before ``triton`` is first imported: the interpreter is chosen when
``@triton.jit`` decorates a kernel, so flipping the variable later has no effect.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Literal

import torch

Backend = Literal["auto", "triton", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_installed() -> bool:
    return "triton" in sys.modules or importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn a user's ``backend`` argument into ``"triton"`` or ``"torch"``.

    Raises ``ValueError`` for an unknown name, or for ``"triton"`` where Triton cannot run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_installed() else "torch"
    if backend == "triton":
        if not triton_installed():
            raise ValueError("backend='triton' needs the `triton` package, which is not installed")
        if device.type == "cpu" and not triton_interpreter_on():
            raise ValueError(
                "backend='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                "before triton is first imported (or use backend='torch', the CPU path)"
            )
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' does not support {device.type} tensors")
    return backend
