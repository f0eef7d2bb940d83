"""Exporting a LoRA model trained from a FILA initialisation (SPEC §3.2): adapter or merged checkpoint.

After training, ``W_res + s·BA = W + s·(BA − B₀A₀) = W + s·[B, −B₀]·[A; A₀]``: on the *original* base
weight the trained model is a rank-``2r`` LoRA adapter with the same scaling. :func:`save_adapter`
writes exactly that as a standard ``peft`` adapter; :func:`save_merged` writes the merged full model.
(The reference code saves ``B, A`` and loads them onto the original base, double-counting ``B₀A₀``.)
``A₀``, ``B₀`` and ``s`` are the records :func:`fastunlearn.fisher.fila.fila_init` left on each layer.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fastunlearn._io import atomic_directory
from fastunlearn.fisher.fila import _require_lora_model, fila_record
from fastunlearn.modeling import strip_wrappers, unwrap_model

# Submodule names under which peft keeps LoRA tensors (never part of the merged checkpoint).
_ADAPTER_PARTS = frozenset(
    {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"}
)

__all__ = ["merged_state_dict", "save_adapter", "save_merged"]


def _require_peft_model(model: nn.Module) -> None:
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(f"expected a peft.PeftModel, got {type(model).__name__}")


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    adapter_name: str = "default",
    overwrite: bool = False,
    state_dict: Mapping[str, Tensor] | None = None,
) -> Path:
    """Write ``adapter_name`` as a standard ``peft`` LoRA adapter for the *original* base model.

    For FILA-initialised layers the adapter is the rank-``2r`` ``[B, −B₀]·[A; A₀]`` with the layer's
    scaling ``s`` (``lora_alpha = 2r·s``, ``use_rslora = False``), because the model's base weights are
    ``W_res = W − s·B₀A₀``; other LoRA layers are written as they are. Per-layer ranks and alphas that
    differ from the most common ones go into ``rank_pattern``/``alpha_pattern`` under the layers' full
    names. ``peft.PeftModel.from_pretrained(original_base, path)`` then reproduces the trained model.
    A base model that is a local directory is recorded by its absolute path.

    Writes ``adapter_config.json`` and ``adapter_model.safetensors`` into ``path`` atomically; an
    existing non-empty ``path`` is replaced only with ``overwrite=True``. Returns the path.

    ``state_dict``: the model's LoRA tensors in full, under the plain ``peft`` model's names, when the
    model's own are shards (FSDP: :func:`fastunlearn.training.fsdp.gathered_state`).
    """
    _require_peft_model(model)
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    layers = _require_lora_model(model, adapter_name)
    peft_state = get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=adapter_name)
    state = {strip_wrappers(k): v.detach() for k, v in peft_state.items()}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for name, (full_name, layer) in layers.items():
        full_name = strip_wrappers(full_name)
        key_A, key_B = f"{full_name}.lora_A.weight", f"{full_name}.lora_B.weight"
        if key_A not in state or key_B not in state:
            raise ValueError(f"peft's state dict has no {key_A!r}/{key_B!r}; cannot export layer {name!r}")
        scaling = float(layer.scaling[adapter_name])
        record = fila_record(layer, adapter_name)
        if record is not None:
            A, B = state[key_A], state[key_B]
            state[key_A] = torch.cat([A.float(), record.A0.to(A.device)], dim=0)
            state[key_B] = torch.cat([B.float(), -record.B0.to(B.device)], dim=1)
        ranks[name] = state[key_A].shape[0]
        alphas[name] = scaling * ranks[name]
    config = copy.deepcopy(model.peft_config[adapter_name])
    config.r = max(set(ranks.values()), key=list(ranks.values()).count)
    config.lora_alpha = _integral(max(set(alphas.values()), key=list(alphas.values()).count))
    config.rank_pattern = {n: r for n, r in ranks.items() if r != config.r}
    config.alpha_pattern = {n: _integral(a) for n, a in alphas.items() if a != config.lora_alpha}
    config.use_rslora = False
    config.init_lora_weights = True  # the saved weights replace any initialisation on load
    base = config.base_model_name_or_path
    if base and os.path.isdir(base):
        # As typed ("./model") the path resolves only from the directory the run was started in.
        config.base_model_name_or_path = os.path.abspath(base)
    tensors = {k: v.to("cpu").contiguous() for k, v in state.items()}
    with atomic_directory(path, overwrite=overwrite) as tmp:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    return Path(path)


def _integral(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def merged_state_dict(
    model: nn.Module, *, adapter_name: str = "default", state_dict: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """The plain model's state dict with every LoRA layer merged: ``W_res + s·B·A`` (= ``W + ΔW``).

    Keys are those of the un-wrapped model (``...q_proj.weight``); adapter tensors are left out. Merged
    weights are computed in fp32, rounded to the base dtype and moved to the CPU one at a time.
    ``state_dict``: the ``peft`` model's whole state in full when its own tensors are shards (FSDP:
    :func:`fastunlearn.training.fsdp.gathered_state`).
    """
    _require_peft_model(model)
    layers = _require_lora_model(model, adapter_name)
    by_prefix = {name + ".": layer for name, (_, layer) in layers.items()}
    if state_dict is None:
        source = unwrap_model(model).state_dict()
    else:
        source = {strip_wrappers(k).removeprefix("base_model.model."): v for k, v in state_dict.items()}
    state: dict[str, Any] = {}
    for key, tensor in source.items():
        if _ADAPTER_PARTS.intersection(key.split(".")):
            continue
        plain = key.replace(".base_layer.", ".")
        prefix = plain.rsplit(".", 1)[0] + "."
        layer = by_prefix.get(prefix)
        if layer is not None and plain.endswith(".weight"):
            with torch.no_grad():
                A = source[f"{prefix}lora_A.{adapter_name}.weight"].float()
                B = source[f"{prefix}lora_B.{adapter_name}.weight"].float()
                merged = tensor.float() + float(layer.scaling[adapter_name]) * (B @ A)
            tensor = merged.to(tensor.dtype)
        state[plain] = tensor.detach().to("cpu")
    return state


def save_merged(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    adapter_name: str = "default",
    overwrite: bool = False,
    state_dict: Mapping[str, Tensor] | None = None,
) -> Path:
    """Write the trained model with its LoRA adapter merged, as a plain ``transformers`` checkpoint.

    Every LoRA-wrapped weight becomes ``W_res + s·B·A`` (for FILA: the original ``W`` plus ``ΔW``);
    ``AutoModelForCausalLM.from_pretrained(path)`` loads it without ``peft``. Safetensors, written
    atomically; the model itself is not modified. ``state_dict``: as for :func:`merged_state_dict`.
    """
    state = merged_state_dict(model, adapter_name=adapter_name, state_dict=state_dict)
    base = unwrap_model(model)
    with atomic_directory(path, overwrite=overwrite) as tmp:
        base.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
    return Path(path)
