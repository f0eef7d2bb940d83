"""The linear layers a Fisher estimate covers, by canonical name (the same on a model and on it wrapped by
``peft``, DDP or DeepSpeed); for a ``peft`` adapter layer, its frozen base layer."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from torch import nn

from fastunlearn.models.naming import canonical_name, unwrap_model


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
