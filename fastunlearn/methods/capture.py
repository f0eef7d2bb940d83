"""Hidden states of a causal LM's own forward: the output head's input, a decoder layer's output.

The KL retain term needs the reference's last hidden states, RMU a decoder layer's output. A hook keeps
them during the patched NLL call (which forms no logits on the fused path), so wrappers' hooks,
autocast and gradient checkpointing apply as in training.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from fastunlearn.models.patching import find_causal_lm

_LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers")


def num_layers(config) -> int:
    """The number of decoder layers a ``transformers`` config declares."""
    for key in _LAYER_COUNTS:
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"the model's config ({type(config).__name__}) gives no number of decoder layers")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of the causal LM in ``model``: the ``nn.ModuleList`` with as many entries as
    its config declares layers."""
    lm = find_causal_lm(model)
    count = num_layers(lm.config)
    for module in lm.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(f"found no list of {count} decoder layers in {type(lm).__name__}")


def forward_capturing(
    model: nn.Module, module: nn.Module, part: Mapping[str, Tensor], *, inputs: bool
) -> Tensor:
    """``module``'s first input (``inputs=True``) or its output's first tensor, from one patched NLL call
    of ``model`` on ``part`` (``input_ids``, ``attention_mask``, ``labels``); the loss is dropped.
    ``RuntimeError`` unless ``module`` ran exactly once."""
    kept: list[Tensor] = []

    def keep_input(_module, args):
        kept.append(args[0])

    def keep_output(_module, _args, output):
        kept.append(output[0] if isinstance(output, tuple) else output)

    hook = (
        module.register_forward_pre_hook(keep_input) if inputs else module.register_forward_hook(keep_output)
    )
    try:
        model(
            input_ids=part["input_ids"],
            attention_mask=part["attention_mask"],
            labels=part["labels"],
            loss_type="nll",
        )
    finally:
        hook.remove()
    if len(kept) != 1:
        raise RuntimeError(f"{type(module).__name__} ran {len(kept)} times in one forward, not once")
    return kept[0]
