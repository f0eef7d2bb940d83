"""Exporting a LoRA model trained from a FILA initialisation: a ``peft`` adapter or a merged checkpoint.

After training, ``W_res + s·BA = W + s·(BA − B₀A₀) = W + s·[B, −B₀]·[A; A₀]``: on the *original* base
weight the trained model is a rank-``2r`` adapter with the same scaling (loading ``B, A`` alone onto the
original base would count ``B₀A₀`` twice). ``A₀``, ``B₀``, ``s`` are the records of :func:`fila_init`.

Under DeepSpeed ZeRO-3 the tensors are gathered one layer at a time (a collective), so the collection
(:func:`adapter_export`, :func:`merged_state_dict`) runs on every rank and the writing on the main one.
Under FSDP the caller gathers the whole state first and passes it as ``state_dict=``.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fastunlearn._hub import snapshot_of
from fastunlearn._io import atomic_directory
from fastunlearn.engines.distributed import gathered
from fastunlearn.fisher.fila import _require_lora_model, fila_record
from fastunlearn.models.naming import strip_wrappers, unwrap_model

# Submodule names under which peft keeps LoRA tensors (never part of the merged checkpoint).
_ADAPTER_PARTS = frozenset(
    {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"}
)


def _require_peft_model(model: nn.Module) -> None:
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(f"expected a peft.PeftModel, got {type(model).__name__}")


@dataclass(frozen=True)
class AdapterExport:
    """An adapter ready to write: its ``peft`` config and its tensors (on the CPU)."""

    config: Any
    tensors: dict[str, Tensor]


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    adapter_name: str = "default",
    overwrite: bool = False,
    state_dict: Mapping[str, Tensor] | None = None,
) -> Path:
    """Write ``adapter_name`` as a standard ``peft`` LoRA adapter for the *original* base model, so that
    ``PeftModel.from_pretrained(original_base, path)`` reproduces the trained model: FILA layers as the
    rank-``2r`` ``[B, −B₀]·[A; A₀]`` with ``lora_alpha = 2r·s``, other ranks and alphas in
    ``rank_pattern``/``alpha_pattern``; the base recorded by absolute path or Hub id and revision.
    Written atomically; ``state_dict``: the whole state when the model holds shards (FSDP).
    """
    export = adapter_export(model, adapter_name=adapter_name, state_dict=state_dict)
    return write_adapter(export, path, overwrite=overwrite)


def adapter_export(
    model: nn.Module, *, adapter_name: str = "default", state_dict: Mapping[str, Tensor] | None = None
) -> AdapterExport:
    """What :func:`save_adapter` writes, collected (under ZeRO-3 by every rank)."""
    _require_peft_model(model)
    from peft.utils import get_peft_model_state_dict

    layers = _require_lora_model(model, adapter_name)
    with warnings.catch_warnings():
        # Under ZeRO-3 peft warns of the empty (partitioned) factors: they are gathered just below.
        warnings.filterwarnings("ignore", message=r"Adapter .* invalid shape")
        peft_state = get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=adapter_name)
    state = {strip_wrappers(k): v.detach() for k, v in peft_state.items()}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for name, (full_name, layer) in layers.items():
        key_A, key_B = f"{full_name}.lora_A.weight", f"{full_name}.lora_B.weight"
        if key_A not in state or key_B not in state:
            raise ValueError(f"peft's state dict has no {key_A!r}/{key_B!r}; cannot export layer {name!r}")
        if state_dict is None:
            params = [layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight]
            with gathered(params):  # whole on every rank inside (ZeRO-3), copied out before the shards return
                state[key_A], state[key_B] = (p.detach().to("cpu", copy=True) for p in params)
        record = fila_record(layer, adapter_name)
        if record is not None:
            A, B = state[key_A], state[key_B]
            state[key_A] = torch.cat([A.float(), record.A0.to(A.device)], dim=0)
            state[key_B] = torch.cat([B.float(), -record.B0.to(B.device)], dim=1)
        ranks[name] = state[key_A].shape[0]
        alphas[name] = float(layer.scaling[adapter_name]) * ranks[name]
    config = copy.deepcopy(model.peft_config[adapter_name])
    config.r = max(set(ranks.values()), key=list(ranks.values()).count)
    config.lora_alpha = _integral(max(set(alphas.values()), key=list(alphas.values()).count))
    config.rank_pattern = {n: r for n, r in ranks.items() if r != config.r}
    config.alpha_pattern = {n: _integral(a) for n, a in alphas.items() if a != config.lora_alpha}
    config.use_rslora = False
    config.init_lora_weights = True  # the saved weights replace any initialisation on load
    base = config.base_model_name_or_path
    snapshot = snapshot_of(base) if base else None
    if snapshot is not None:  # a model of the Hugging Face cache: its Hub id at the commit trained on
        config.base_model_name_or_path, config.revision = snapshot.repo_id, snapshot.revision
    elif base and os.path.isdir(base):
        # As typed ("./model") the path resolves only from the directory the run was started in.
        config.base_model_name_or_path = os.path.abspath(base)
    empty = sorted(k for k, v in state.items() if v.numel() == 0)
    if empty:  # a peft extra (modules_to_save, biases) partitioned by ZeRO-3: not a LoRA factor
        raise ValueError(f"cannot export the adapter tensors {empty[:4]}: they are empty (partitioned?)")
    return AdapterExport(config, {k: v.to("cpu").contiguous() for k, v in state.items()})


def write_adapter(export: AdapterExport, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write an :func:`adapter_export` into ``path``, atomically (see :func:`save_adapter`)."""
    from safetensors.torch import save_file

    with atomic_directory(path, overwrite=overwrite) as tmp:
        export.config.save_pretrained(str(tmp))
        save_file(export.tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    return Path(path)


def _integral(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def merged_state_dict(
    model: nn.Module,
    *,
    adapter_name: str = "default",
    keep: bool = True,
    state_dict: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """The plain model's state dict (un-wrapped keys, no adapter tensors) with every LoRA layer merged,
    ``W_res + s·B·A`` computed in fp32 and rounded to the base dtype, one module at a time on the CPU.
    Under ZeRO-3 every rank must call it (``keep=False`` takes part without keeping a copy);
    ``state_dict``: the whole state, read instead of the model (FSDP).
    """
    _require_peft_model(model)
    layers = _require_lora_model(model, adapter_name)
    if state_dict is not None:
        return _merged_from_state(layers, state_dict, adapter_name)
    lora_of_base = {id(layer.get_base_layer()): layer for _, (_, layer) in layers.items()}
    state: dict[str, Any] = {}
    for prefix, module in unwrap_model(model).named_modules():
        if _ADAPTER_PARTS.intersection(prefix.split(".")):
            continue
        params = list(module.parameters(recurse=False))
        lora = lora_of_base.get(id(module))
        if lora is not None:
            params += [lora.lora_A[adapter_name].weight, lora.lora_B[adapter_name].weight]
        with gathered(params), torch.no_grad():
            if not keep:
                continue
            for name, tensor in module.state_dict(keep_vars=True).items():
                if "." in name:  # a submodule's: taken in its own turn
                    continue
                key = f"{prefix}.{name}".replace(".base_layer.", ".") if prefix else name
                if lora is not None and name == "weight":
                    A, B = lora.lora_A[adapter_name].weight, lora.lora_B[adapter_name].weight
                    tensor = _merge(tensor, A, B, lora.scaling[adapter_name])
                state[key] = tensor.detach().to("cpu", copy=True)
    return state


def _merge(weight: Tensor, A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """``W + s·B·A`` in fp32, rounded to the weight's dtype."""
    return (weight.float() + float(scaling) * (B.float() @ A.float())).to(weight.dtype)


def _merged_from_state(
    layers: Mapping[str, Any], state_dict: Mapping[str, Tensor], adapter_name: str
) -> dict[str, Tensor]:
    by_prefix = {name + ".": layer for name, (_, layer) in layers.items()}
    source = {strip_wrappers(k).removeprefix("base_model.model."): v for k, v in state_dict.items()}
    state: dict[str, Tensor] = {}
    for key, tensor in source.items():
        if _ADAPTER_PARTS.intersection(key.split(".")):
            continue
        plain = key.replace(".base_layer.", ".")
        prefix = plain.rsplit(".", 1)[0] + "."
        layer = by_prefix.get(prefix)
        if layer is not None and plain.endswith(".weight"):
            A, B = (source[f"{prefix}lora_{x}.{adapter_name}.weight"] for x in "AB")
            with torch.no_grad():
                tensor = _merge(tensor, A, B, layer.scaling[adapter_name])
        state[plain] = tensor.detach().to("cpu")
    return state


def save_merged(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    adapter_name: str = "default",
    overwrite: bool = False,
    state_dict: dict[str, Tensor] | None = None,
) -> Path:
    """Write the trained model with its LoRA adapter merged (:func:`merged_state_dict`) as a plain
    ``transformers`` checkpoint that loads without ``peft``; safetensors, written atomically, the model
    unchanged. ``state_dict``: the merged state already collected (by every rank under ZeRO-3).
    """
    state = merged_state_dict(model, adapter_name=adapter_name) if state_dict is None else state_dict
    base = unwrap_model(model)
    with atomic_directory(path, overwrite=overwrite) as tmp:
        base.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
    return Path(path)
