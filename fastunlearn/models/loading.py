"""The one model loader, and what can be known about a model before its weights load (minutes at 7B).

Policy, safe by default: local directories, or Hugging Face Hub ids found in the local cache
(:mod:`fastunlearn._hub`; fetched only with ``allow_download``); safetensors only, never pickles; the
model's own code only with ``trust_remote_code``. ``transformers`` and ``peft`` are imported inside the
functions: ``import fastunlearn`` stays free of both. Base models stored in 4 or 8 bits by
``bitsandbytes``: QLoRA's recipe (Dettmers et al. 2023, arXiv 2305.14314: NF4 weights, double-quantised
scales, LoRA adapters in full precision) and LLM.int8() (Dettmers et al. 2022, arXiv 2208.07339).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fastunlearn._hub import MODEL_FILES, is_hub_id, resolve_snapshot

ADAPTER_CONFIG = "adapter_config.json"
_DTYPE_RENAMED_IN = (4, 56)  # from_pretrained's `torch_dtype` became `dtype`
_HUB_KERNELS_FROM = (4, 54)  # from_pretrained takes `use_kernels` (on by default in transformers 5)
_QUANTISED_PARAMS = ("Params4bit", "Int8Params")


def _local(name: str, what: str, allow_download: bool, revision: str | None = None) -> str:
    """A local directory as it is; a Hub id resolved to its cached snapshot."""
    if os.path.isdir(name):
        return name
    if os.path.exists(name) or not is_hub_id(name):
        raise FileNotFoundError(
            f"{what} directory not found: {name!r} is neither a local directory nor a Hugging Face Hub id"
        )
    return resolve_snapshot(
        name, revision=revision, allow_download=allow_download, patterns=MODEL_FILES, what=what
    ).path


def read_json_object(path: str) -> dict:
    """A JSON object from ``path``, or a one-line ``ValueError`` naming the file and what is wrong."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file (JSON expected)") from None
    except OSError as err:
        raise ValueError(f"{path}: cannot be read ({err.strerror or err})") from None
    except json.JSONDecodeError as err:
        what = "empty" if not err.doc.strip() else f"invalid JSON ({err.msg} at line {err.lineno})"
        raise ValueError(f"{path}: {what}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def check_model_dir(path: str | os.PathLike, *, what: str = "model") -> None:
    """``ValueError`` naming what a model directory lacks (``config.json``, safetensors weights, a shard
    its index names) or an adapter directory (``adapter_model.safetensors``); the weights are not read."""
    path = os.fspath(path)
    names = set(os.listdir(path))
    if ADAPTER_CONFIG in names:
        if "adapter_model.safetensors" not in names:
            raise ValueError(f"adapter directory {path!r} holds no adapter_model.safetensors")
        return
    if "config.json" not in names:
        raise ValueError(
            f"{what} directory {path!r} holds no config.json: it is not a Hugging Face model directory"
        )
    read_json_object(os.path.join(path, "config.json"))
    if not any(name.endswith(".safetensors") for name in names):
        raise ValueError(
            f"{what} directory {path!r} holds no safetensors weights; fastunlearn does not load pickled "
            "checkpoints (pytorch_model.bin): save the model with save_pretrained() first"
        )
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        shards = set(read_json_object(index).get("weight_map", {}).values())
        missing = sorted(shards - names)
        if missing:
            raise ValueError(f"{what} directory {path!r} lacks the weight shard(s) {missing} its index names")


def adapter_base(
    path: str | os.PathLike, base_model: str | os.PathLike | None = None, *, allow_download: bool = False
) -> str:
    """The checked local directory of the base model a ``peft`` adapter loads on: ``base_model`` if
    given, else the one its ``adapter_config.json`` records (a Hub id at its recorded revision);
    ``FileNotFoundError`` suggesting ``base_model`` when the recorded one is not found."""
    path = os.fspath(path)
    if base_model is not None:
        base = _local(os.fspath(base_model), "base model", allow_download)
    else:
        recorded = read_json_object(os.path.join(path, ADAPTER_CONFIG))
        base_model, revision = recorded.get("base_model_name_or_path"), recorded.get("revision")
        if not base_model:
            raise ValueError(f"adapter {path!r} records no base model; pass base_model=PATH")
        try:
            base = _local(base_model, "base model", allow_download, revision)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"adapter {path!r} was trained on the base model {base_model!r}, which is neither a local "
                "directory nor in the Hugging Face cache; pass base_model=PATH with the base model's "
                "directory"
            ) from None
    check_model_dir(base, what="base model")
    return base


def load_config(source: str, *, trust_remote_code: bool = False) -> Any:
    """The ``transformers`` configuration of a local model directory."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source, local_files_only=True, trust_remote_code=trust_remote_code)


def model_skeleton(config: Any, *, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM of ``config`` on the ``meta`` device: the loaded model's modules and shapes, no
    memory, so target modules and ranks can be checked before the weights load."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def load_tokenizer(
    source: str | os.PathLike, *, trust_remote_code: bool = False, allow_download: bool = False
):
    """The tokenizer saved in a local directory or, by Hub id, in the Hugging Face cache."""
    from transformers import AutoTokenizer

    name = _local(os.fspath(source), "tokenizer", allow_download)
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"tokenizer {name!r}: no tokenizer could be loaded from it ({first.strip()})"
        ) from None


@contextmanager
def quiet_peft_wrap() -> Iterator[None]:
    """Silence the ``FutureWarning`` peft's wrapping triggers under transformers 5 (it reads the
    deprecated ``is_gradient_checkpointing``): it concerns peft, not the user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


@dataclass(frozen=True)
class ModelSource:
    """Where a model named by path loads from: ``path``; for a ``peft`` adapter its ``base`` model; the
    directory its ``tokenizer`` loads from (the adapter's when saved beside it, else the base's)."""

    path: str
    base: str | None
    tokenizer: str


def model_source(
    model: str | os.PathLike,
    *,
    base_model: str | os.PathLike | None = None,
    allow_download: bool = False,
    revision: str | None = None,
) -> ModelSource:
    """Resolve and check a model path, or a Hub id at ``revision`` (refused for a local path), without
    loading anything heavy; ``FileNotFoundError`` / ``ValueError`` name the path at fault."""
    name = os.fspath(model)
    if revision is not None and os.path.exists(name):
        raise ValueError(
            f"revision={revision!r} names a Hub revision, but the model {name!r} is a local path"
        )
    path = os.path.abspath(_local(name, "model", allow_download, revision))
    check_model_dir(path)
    if not os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
        return ModelSource(path, None, path)
    base = os.path.abspath(adapter_base(path, base_model, allow_download=allow_download))
    own_tokenizer = os.path.isfile(os.path.join(path, "tokenizer_config.json"))
    return ModelSource(path, base, path if own_tokenizer else base)


def resolve_model(
    model: nn.Module | str | os.PathLike,
    tokenizer: Any = None,
    *,
    base_model: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
    allow_download: bool = False,
    revision: str | None = None,
) -> tuple[ModelSource | None, Any]:
    """Where a model argument loads from (its :class:`ModelSource`; ``None`` for an ``nn.Module``) and
    its tokenizer, loaded, before any weight is read. ``tokenizer``: an object, kept; a path or Hub id,
    loaded; ``None``, the one saved with a model path (``TypeError`` for a model object)."""
    source = None
    if isinstance(model, (str, os.PathLike)):
        source = model_source(model, base_model=base_model, allow_download=allow_download, revision=revision)
        if tokenizer is None:
            tokenizer = source.tokenizer
    elif not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module or a local path, got {type(model).__name__}")
    elif tokenizer is None:
        raise TypeError("pass the tokenizer with a model object (it can only be found from a model path)")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(
            tokenizer, trust_remote_code=trust_remote_code, allow_download=allow_download
        )
    return source, tokenizer


@contextmanager
def _unreadable(path: str) -> Iterator[None]:
    """Weights that cannot be read (a truncated or corrupt file) as one ``ValueError``."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as err:
        raise ValueError(f"cannot read the weights in {path!r}: {err}") from err


def load_model_and_tokenizer(
    model: nn.Module | str | os.PathLike,
    tokenizer: Any = None,
    *,
    trust_remote_code: bool = False,
    allow_download: bool = False,
    dtype: torch.dtype | str | None = None,
    base_model: str | os.PathLike | None = None,
    revision: str | None = None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
) -> tuple[nn.Module, Any]:
    """A causal LM and its tokenizer from objects, directories or Hub ids (module docstring's policy).

    A ``peft`` adapter directory loads as that adapter on its base (:func:`adapter_base`). ``dtype``
    defaults to the checkpoint's. ``load_in_4bit`` / ``load_in_8bit``: linear layers stored quantised
    by ``bitsandbytes`` on the training device (4-bit computes in ``dtype``, fp32 if not given). A local
    directory loads by its absolute path, so an adapter trained on it records a path valid anywhere.
    """
    from transformers import AutoModelForCausalLM

    weights, quantised = _pretrained_options(trust_remote_code, dtype, load_in_4bit, load_in_8bit)
    source, tokenizer = resolve_model(
        model,
        tokenizer,
        base_model=base_model,
        trust_remote_code=trust_remote_code,
        allow_download=allow_download,
        revision=revision,
    )
    if source is not None:
        with _unreadable(source.base or source.path):
            base = AutoModelForCausalLM.from_pretrained(source.base or source.path, **weights)
        if quantised:
            keep_trainable_layout(base)
        if source.base is None:
            model = base
        else:
            from peft import PeftModel

            with _unreadable(source.path), quiet_peft_wrap():
                model = PeftModel.from_pretrained(base, source.path)
    elif quantised:
        raise ValueError(
            "load_in_4bit / load_in_8bit quantise a model loaded by path; the model given is already "
            "loaded (pass it quantised, or pass its path)"
        )
    return model, tokenizer


def _pretrained_options(
    trust_remote_code: bool, dtype: torch.dtype | str | None, load_in_4bit: bool, load_in_8bit: bool
) -> tuple[dict[str, Any], bool]:
    """``from_pretrained``'s keyword arguments, and whether they quantise."""
    dtype_arg = "dtype" if _transformers_version() >= _DTYPE_RENAMED_IN else "torch_dtype"
    weights = {
        "local_files_only": True,  # a Hub id is resolved to its cached snapshot first
        "trust_remote_code": trust_remote_code,
        dtype_arg: dtype if dtype is not None else "auto",
        "use_safetensors": True,
    }
    if _transformers_version() >= _HUB_KERNELS_FROM:
        # Off: hub kernels are downloaded, replace layers whose numerics and memory the plan and the
        # fused losses assume, and re-kernelize the model at every train()/eval() switch.
        weights["use_kernels"] = False
    compute = dtype if isinstance(dtype, torch.dtype) else torch.float32
    quantised = quantization_config(
        load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit, compute_dtype=compute
    )
    if quantised is not None:
        from fastunlearn.models.devices import training_device

        # bitsandbytes quantises the weights as they reach their device: the one training runs on.
        weights.update(quantization_config=quantised, device_map={"": str(training_device())})
    return weights, quantised is not None


def _transformers_version() -> tuple[int, int]:
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


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
