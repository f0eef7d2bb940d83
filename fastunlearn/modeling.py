"""Models as fastunlearn meets them: loading, unwrapping, naming and placement.

- :func:`load_model_and_tokenizer`: a causal LM and its tokenizer from objects or local directories.
- :func:`unwrap_model`: the model under a ``peft`` wrapper.
- :func:`canonical_name`: a layer's name with what wrappers add stripped, so that state taken on a
  plain model and on the same model wrapped by ``peft``/DDP/DeepSpeed share their keys.
- :func:`model_device`, :func:`training_device`, :func:`to_training_device`: where a model is, and
  the device ``Trainer`` will train on.
- :func:`resolve_precision`: the compute precision a device supports (``"auto"``: bf16 on CUDA sm_80+,
  fp32 elsewhere).

``transformers`` and ``peft`` are imported inside the functions that need them: the Fisher layer uses
this module, and ``import fastunlearn`` must stay free of both.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

__all__ = [
    "PRECISIONS",
    "PRECISION_DTYPES",
    "canonical_name",
    "load_model_and_tokenizer",
    "model_device",
    "resolve_precision",
    "to_training_device",
    "training_device",
    "unwrap_model",
]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# transformers 4.56 renamed from_pretrained's `torch_dtype` to `dtype` (the old name is deprecated).
_DTYPE_RENAMED_IN = (4, 56)


def canonical_name(name: str) -> str:
    """The name of a linear layer in the plain (un-wrapped) model.

    Strips what wrappers add, so that estimates taken on a ``transformers`` model and on the same model
    wrapped by ``peft`` (or DDP/DeepSpeed) share their keys:
    ``module.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight`` →
    ``model.layers.0.self_attn.q_proj``.
    """
    for prefix in ("module.", "base_model.model."):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    for suffix in (".weight", ".base_layer"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model under a ``peft`` wrapper (with its adapter layers in place), or ``model`` itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def load_model_and_tokenizer(
    model: nn.Module | str | os.PathLike,
    tokenizer: Any = None,
    *,
    trust_remote_code: bool = False,
    allow_download: bool = False,
    dtype: torch.dtype | str | None = None,
) -> tuple[nn.Module, Any]:
    """A causal LM and its tokenizer, from objects or directories: the one loader of fastunlearn.

    Policy (safe by default): directories on local disk only, unless ``allow_download`` lets a name be
    a Hugging Face Hub id; the model's own Python code runs only with ``trust_remote_code``; weights
    load from safetensors only (no pickle). A directory holding a ``peft`` adapter
    (``adapter_config.json``) is loaded as that adapter on its base model, with the tokenizer saved
    beside the adapter or else the base model's. ``dtype`` defaults to the checkpoint's (``"auto"``).
    ``model`` may also be a loaded ``nn.Module``, returned as it is with ``tokenizer`` (an object or a
    directory).

    Raises ``FileNotFoundError`` naming the path when it is not a local directory and downloads are not
    allowed, ``ValueError`` for a directory without safetensors weights, and ``TypeError`` for a model
    object without a tokenizer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def local(name: str, what: str) -> str:
        if not allow_download and not os.path.isdir(name):
            raise FileNotFoundError(
                f"{what} directory not found: {name!r} is not a local directory. fastunlearn loads local "
                "models only; pass allow_download=True (--allow-download) to fetch it from the Hugging "
                "Face Hub"
            )
        return name

    options: dict[str, Any] = dict(local_files_only=not allow_download, trust_remote_code=trust_remote_code)
    dtype_arg = "dtype" if _transformers_version() >= _DTYPE_RENAMED_IN else "torch_dtype"
    source = None
    if isinstance(model, (str, os.PathLike)):
        source = local(os.fspath(model), "model")
        if os.path.isdir(source) and not any(f.endswith(".safetensors") for f in os.listdir(source)):
            raise ValueError(
                f"model directory {source!r} holds no safetensors weights; fastunlearn does not load "
                "pickled checkpoints (pytorch_model.bin): save the model with save_pretrained() first"
            )
        weights = {**options, dtype_arg: dtype if dtype is not None else "auto", "use_safetensors": True}
        if os.path.isfile(os.path.join(source, "adapter_config.json")):
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(source, **weights)
            if not os.path.isfile(os.path.join(source, "tokenizer_config.json")):
                source = model.peft_config["default"].base_model_name_or_path
        else:
            model = AutoModelForCausalLM.from_pretrained(source, **weights)
    elif not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module or a local path, got {type(model).__name__}")
    if tokenizer is None:
        if source is None:
            raise TypeError("pass the tokenizer with a model object (it can only be found from a model path)")
        tokenizer = source
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(local(os.fspath(tokenizer), "tokenizer"), **options)
    return model, tokenizer


def _transformers_version() -> tuple[int, int]:
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


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
    """Move a CPU model to the GPU ``Trainer`` will use, so evaluation, Fisher and NPO's reference run there.

    Models dispatched with a ``device_map`` and runs without CUDA are left where they are.
    """
    on_cpu = model_device(model).type == "cpu"
    if torch.cuda.is_available() and on_cpu and getattr(model, "hf_device_map", None) is None:
        model.to(training_device())


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"fp32"``, ``"bf16"`` or ``"fp16"``: the compute precision ``precision`` means on ``device``.

    ``"auto"`` is bf16 on CUDA GPUs of compute capability 8.0 or newer (Ampere and later: native bf16
    matmuls) and fp32 everywhere else. fp32 is the CPU default even though CPUs run bf16: without
    AVX512-BF16 or AMX, bf16 matmuls are emulated and slower than fp32, so bf16 there is for those who
    ask. ``"bf16"`` is refused on other GPUs (sm < 80 emulate it, slowly, and some kernels lack it),
    with the alternatives. What fp16 needs (loss scaling) is the caller's to check.
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
