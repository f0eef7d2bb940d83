"""4-bit and 8-bit base models with ``bitsandbytes``: QLoRA's recipe (Dettmers et al. 2023,
arXiv 2305.14314: NF4 weights, double-quantised scales, LoRA adapters in full precision) and
LLM.int8() (Dettmers et al. 2022, arXiv 2208.07339).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch
from torch import Tensor, nn

_QUANTISED_PARAMS = ("Params4bit", "Int8Params")


def require_bitsandbytes(option: str) -> None:
    """``ValueError`` naming ``option`` when ``bitsandbytes`` is not installed."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(
            f"{option} needs the bitsandbytes package: pip install 'fastunlearn[quant]' (or bitsandbytes)"
        )


def _not_the_fp16_cast(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def quantization_config(*, load_in_4bit: bool, load_in_8bit: bool, compute_dtype: torch.dtype) -> Any:
    """``BitsAndBytesConfig`` for a 4-bit (NF4, double quantisation) or 8-bit base, or ``None``."""
    if load_in_4bit and load_in_8bit:
        raise ValueError("load_in_4bit and load_in_8bit exclude each other; choose one")
    if not (load_in_4bit or load_in_8bit):
        return None
    require_bitsandbytes("load_in_4bit" if load_in_4bit else "load_in_8bit")
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        # LLM.int8() quantises each layer's input through fp16 by design; bitsandbytes logs so at every call.
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_not_the_fp16_cast)
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=torch.uint8,
    )


def is_quantized(layer: nn.Module) -> bool:
    """Whether ``layer``'s weight is stored quantised by ``bitsandbytes`` (4- or 8-bit)."""
    weight = getattr(layer, "weight", None)
    return type(weight).__name__ in _QUANTISED_PARAMS


def keep_trainable_layout(model: nn.Module) -> None:
    """Keep ``bitsandbytes``' CPU inference repacking off every 4-bit layer of ``model``.

    On CPUs with AVX512-BF16 it repacks a 4-bit weight the first time the layer runs in eval mode
    without gradients, then multiplies by it with an operation that has no backward, so gradients to
    earlier layers would be wrong. ``ValueError`` for a layer repacked already.
    """
    for name, module in model.named_modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            _check_layout(name, module)
            module.support_avx512bf16_for_cpu = False


def _check_layout(name: str, layer: nn.Module) -> None:
    if getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False):
        raise ValueError(
            f"layer {name!r}: bitsandbytes has repacked its 4-bit weight for CPU inference (the model ran in "
            "eval mode without gradients), a layout that trains wrongly; load the model again"
        )


def dequantized_weight(layer: nn.Module) -> Tensor:
    """A ``bitsandbytes`` linear layer's weight as fp32 ``[out, in]`` on its device: 4-bit blocks times
    their scales; 8-bit rows ``W = C·s/127``, ``s`` each row's absolute maximum."""
    import bitsandbytes.functional as bnbf

    _check_layout(type(layer).__name__, layer)
    weight = layer.weight
    with torch.no_grad():
        if type(weight).__name__ == "Params4bit":
            dense = bnbf.dequantize_4bit(weight.data, weight.quant_state)
        else:
            scales = weight.SCB if weight.SCB is not None else layer.state.SCB
            dense = weight.data.float() * (scales.float()[:, None] / 127.0)
    return dense.to(torch.float32).reshape(layer.out_features, layer.in_features)
