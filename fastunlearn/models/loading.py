"""Models as fastunlearn meets them: checking, loading, unwrapping, naming and placement.

- :func:`load_model_and_tokenizer`: a causal LM and its tokenizer from objects, local directories or
  Hugging Face Hub ids found in the local cache (:mod:`fastunlearn._hub`), optionally with 4-bit or
  8-bit weights (:mod:`fastunlearn.models.quantization`).
- :func:`model_source`, :func:`check_model_dir`, :func:`adapter_base`, :func:`load_config`,
  :func:`model_skeleton`, :func:`load_tokenizer`, :func:`resolve_model`: what can be known about a
  model before its weights load (minutes at 7B): that its directory holds weights, which base an
  adapter needs, its configuration, its modules (on the ``meta`` device, without memory), its tokenizer.
- :func:`unwrap_model`: the model under a ``peft`` wrapper.
- :func:`canonical_name`: a layer's name with what wrappers add stripped, so that state taken on a
  plain model and on the same model wrapped by ``peft``/DDP/FSDP/DeepSpeed share their keys;
  :func:`strip_wrappers`: a name without the distributed wrappers' parts (``peft``'s kept).
- :func:`model_device`, :func:`training_device`, :func:`to_training_device`, :func:`resolve_device`,
  :func:`num_threads`: where a model is, the device ``Trainer`` will train on, a device named by the
  user, and PyTorch's threads.
- :func:`quiet_peft_wrap`: wrapping a model with ``peft`` without the deprecation warning it triggers.
- :func:`resolve_precision`: the compute precision a device supports (``"auto"``: bf16 on CUDA sm_80+,
  fp32 elsewhere).

``transformers`` and ``peft`` are imported inside the functions that need them: the Fisher layer uses
this module, and ``import fastunlearn`` must stay free of both.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastunlearn._hub import MODEL_FILES, is_hub_id, resolve_snapshot
from fastunlearn.models.quantization import keep_trainable_layout, quantization_config

__all__ = [
    "ModelSource",
    "adapter_base",
    "check_model_dir",
    "load_config",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "model_skeleton",
    "model_source",
    "quiet_peft_wrap",
    "resolve_model",
]

ADAPTER_CONFIG = "adapter_config.json"
# transformers 4.56 renamed from_pretrained's `torch_dtype` to `dtype` (the old name is deprecated).
_DTYPE_RENAMED_IN = (4, 56)
# transformers 4.54 added `use_kernels`: Hugging Face's hub kernels swapped into a model's layers, which
# transformers 5 does by default whenever the `kernels` package is installed (it comes with transformers).
_HUB_KERNELS_FROM = (4, 54)


def _local(name: str, what: str, allow_download: bool, revision: str | None = None) -> str:
    """A local directory as it is; a Hub id resolved to its snapshot in the local Hugging Face cache
    (fetched only with ``allow_download``; :func:`fastunlearn._hub.resolve_snapshot`)."""
    if os.path.isdir(name):
        return name
    if os.path.exists(name) or not is_hub_id(name):
        raise FileNotFoundError(
            f"{what} directory not found: {name!r} is neither a local directory nor a Hugging Face Hub id"
        )
    return resolve_snapshot(
        name, revision=revision, allow_download=allow_download, patterns=MODEL_FILES, what=what
    ).path


def _read_json_object(path: str) -> dict:
    """A JSON object from ``path``, or a one-line ``ValueError`` naming the file and what is wrong."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file (JSON expected)") from None
    except json.JSONDecodeError as err:
        what = "empty" if not err.doc.strip() else f"invalid JSON ({err.msg} at line {err.lineno})"
        raise ValueError(f"{path}: {what}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def check_model_dir(path: str | os.PathLike, *, what: str = "model") -> None:
    """Check that a local directory holds a loadable checkpoint, without reading the weights.

    A model directory needs ``config.json`` and safetensors weights (every shard its
    ``model.safetensors.index.json`` names); an adapter directory (``adapter_config.json``)
    ``adapter_model.safetensors``. Raises ``ValueError`` naming the directory and what is missing.
    """
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
    _read_json_object(os.path.join(path, "config.json"))
    if not any(name.endswith(".safetensors") for name in names):
        raise ValueError(
            f"{what} directory {path!r} holds no safetensors weights; fastunlearn does not load pickled "
            "checkpoints (pytorch_model.bin): save the model with save_pretrained() first"
        )
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            shards = set(json.load(handle).get("weight_map", {}).values())
        missing = sorted(shards - names)
        if missing:
            raise ValueError(f"{what} directory {path!r} lacks the weight shard(s) {missing} its index names")


def adapter_base(
    path: str | os.PathLike, base_model: str | os.PathLike | None = None, *, allow_download: bool = False
) -> str:
    """The local directory of the base model a ``peft`` adapter directory loads on: ``base_model`` if
    given, else the one its ``adapter_config.json`` records (a Hub id at its recorded revision is found in
    the Hugging Face cache); checked with :func:`check_model_dir`.

    Raises ``FileNotFoundError`` naming the recorded base when it is neither a local directory nor
    cached (an adapter moved to another machine, or one that recorded a relative path), suggesting
    ``base_model``.
    """
    path = os.fspath(path)
    if base_model is not None:
        base = _local(os.fspath(base_model), "base model", allow_download)
    else:
        with open(os.path.join(path, ADAPTER_CONFIG), encoding="utf-8") as handle:
            recorded = json.load(handle)
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
    """The ``transformers`` configuration of a local model directory (:func:`model_source` resolves a
    Hub id to one)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source, local_files_only=True, trust_remote_code=trust_remote_code)


def model_skeleton(config: Any, *, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM of ``config`` on the ``meta`` device: every module with its shapes, no memory.

    Module names and weight shapes are those of the loaded model, so target modules and ranks can be
    checked before the weights load.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def load_tokenizer(
    source: str | os.PathLike, *, trust_remote_code: bool = False, allow_download: bool = False
):
    """The tokenizer saved in a local directory or, by Hub id, in the Hugging Face cache (fetched with
    ``allow_download``)."""
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
    """Silence the ``FutureWarning`` that wrapping a model with ``peft`` triggers under transformers 5.

    ``peft.PeftModel.__init__`` reads ``model.is_gradient_checkpointing``, a property transformers 5
    deprecated; the warning concerns peft, not the user, and would print on every adapter load.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


@dataclass(frozen=True)
class ModelSource:
    """Where a model named by path loads from: ``path`` (absolute when local); for a ``peft`` adapter
    directory its ``base`` model; and the directory its ``tokenizer`` loads from (the adapter's when
    saved beside it, else the base model's)."""

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
    """Resolve and check a model path or Hub id without loading anything heavy (:func:`check_model_dir`,
    :func:`adapter_base`); ``FileNotFoundError`` / ``ValueError`` name the path at fault.

    A Hub id is its snapshot in the local Hugging Face cache at ``revision`` (a branch, tag or commit;
    default ``main``), fetched only with ``allow_download``; ``revision`` is refused for a local path.
    """
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
    """Where a model argument loads from and its tokenizer, loaded, before any weight is read.

    ``model``: a local path or Hub id (resolved and checked by :func:`model_source`; returned as its
    :class:`ModelSource`) or an ``nn.Module`` (``None``). ``tokenizer``: an object, returned as it is;
    a directory or Hub id, loaded; ``None``, the one saved with a model path. Raises ``TypeError`` for a
    model that is neither, or a model object without a tokenizer. :func:`load_model_and_tokenizer` and
    the run's preflight both resolve their arguments here.
    """
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
    """Report weights that exist but cannot be read (a truncated or corrupt file) as one ``ValueError``."""
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
    """A causal LM and its tokenizer, from objects, directories or Hub ids: the one loader of fastunlearn.

    Policy (safe by default): local directories, and Hugging Face Hub ids found in the local cache at
    ``revision`` (:func:`model_source`); nothing is fetched unless ``allow_download``; the model's own
    Python code runs only with ``trust_remote_code``; weights load from safetensors only (no pickle). A
    directory holding a ``peft`` adapter (``adapter_config.json``) is loaded as that adapter on its base
    model (:func:`adapter_base`: ``base_model`` if given, else the recorded one), with the tokenizer
    saved beside the adapter or else the base model's. ``dtype`` defaults to the checkpoint's
    (``"auto"``). ``load_in_4bit`` / ``load_in_8bit``: the linear layers stored quantised by
    ``bitsandbytes`` (:mod:`fastunlearn.models.quantization`; 4-bit computes in ``dtype``, fp32 when it
    is not given), the rest in ``dtype``, on the training device. ``model`` may also be a loaded
    ``nn.Module``, returned as it is with ``tokenizer`` (an object or a directory). A local directory is
    loaded by its absolute path, so that the model (and an adapter trained on it) records a path that
    resolves from anywhere.

    Raises ``FileNotFoundError`` naming the path when it is neither a local directory nor cached and
    downloads are not allowed, ``ValueError`` for a directory without safetensors weights
    (:func:`check_model_dir`), and ``TypeError`` for a model object without a tokenizer.
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
    # transformers 4.56 renamed from_pretrained's `torch_dtype` to `dtype`.
    dtype_arg = "dtype" if _transformers_version() >= _DTYPE_RENAMED_IN else "torch_dtype"
    weights = {
        "local_files_only": True,  # a Hub id is resolved to its cached snapshot first
        "trust_remote_code": trust_remote_code,
        dtype_arg: dtype if dtype is not None else "auto",
        "use_safetensors": True,
    }
    if _transformers_version() >= _HUB_KERNELS_FROM:
        # Off: hub kernels are fetched from the Hub for the device (no downloads unless asked), they
        # replace layers whose numerics and memory the plan, the oracles and the fused losses assume,
        # and every train()/eval() switch re-kernelizes the whole model (about 5 ms of a 35 ms
        # evaluation of the demo's LoRA model on CPU). fastunlearn runs its own kernels.
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
