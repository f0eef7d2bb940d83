"""Layer names and models under wrappers: what ``peft``, DDP, FSDP and DeepSpeed add, stripped."""

from __future__ import annotations

from torch import nn

# What FSDP1 (``_fsdp_wrapped_module``), activation-checkpoint wrappers and ``torch.compile`` insert
# into module names, anywhere along the path.
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def strip_wrappers(name: str) -> str:
    """A name without what distributed wrappers insert: the leading ``module.`` of DDP / DeepSpeed and
    every part of :data:`_WRAPPER_PARTS` (``peft``'s ``base_model.model.`` is kept)."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name.removeprefix("module.")


def canonical_name(name: str) -> str:
    """The name of a linear layer in the plain model, so that state taken on it and on the same model
    under ``peft`` (and DDP/FSDP/DeepSpeed) share keys: ``module.base_model.model.model.layers.0.
    self_attn.q_proj.base_layer.weight`` → ``model.layers.0.self_attn.q_proj``."""
    name = strip_wrappers(name).removeprefix("module.").removeprefix("base_model.model.")
    return name.removesuffix(".weight").removesuffix(".base_layer")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model under a ``peft`` wrapper (with its adapter layers in place), or ``model`` itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model
