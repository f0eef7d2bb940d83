"""RMU's setting: the steered layer, the random direction, and the weights it trains (Li et al. 2024,
WMDP, arXiv 2403.03218); a causal LM's decoder layers.

At decoder layer ℓ the forget batch's activations are pushed towards ``c·u`` (``u`` a fixed random
direction, uniform in ``[0, 1)^d`` and normalised, ``c`` the steering coefficient) and the retain
batch's held to the reference model's; only the MLP down-projections of layers ℓ−2..ℓ train (full
weights or LoRA on them). ℓ defaults to 7 (WMDP's, for 7B models of 32 layers) and to the middle layer
of models with fewer than 16 layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
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


# The MLP's output projection under each architecture's name (Llama/Mistral/Qwen/Gemma, GPT-NeoX, Phi,
# GPT-2/GPT-Neo).
DOWN_PROJECTIONS = ("down_proj", "dense_4h_to_h", "fc2", "c_proj")


def resolve_rmu_layers(
    config, layer: int | None, train_layers: Sequence[int] | None
) -> tuple[int, list[int]]:
    """ℓ and the trained layers for a model of ``config``; a trained layer above ℓ is refused (it cannot
    change layer ℓ's output)."""
    count = num_layers(config)
    if layer is None:
        layer = 7 if count >= 16 else count // 2
    if not 0 <= layer < count:
        raise ValueError(
            f"rmu_layer={layer} is out of range: the model has {count} decoder layers (0..{count - 1})"
        )
    trained = list(range(max(0, layer - 2), layer + 1)) if train_layers is None else sorted(set(train_layers))
    wrong = [i for i in trained if not 0 <= i <= layer]
    if wrong or not trained:
        raise ValueError(
            f"rmu_train_layers {wrong or '[]'} out of range: RMU trains layers at or below rmu_layer={layer} "
            "(a later one cannot change that layer's output)"
        )
    return layer, trained


def down_projections(model: nn.Module, layers: Sequence[int]) -> list[str]:
    """The names in ``model`` of the MLP down-projections of decoder ``layers``: RMU's trained weights."""
    stack = decoder_layers(model)
    names = {id(module): name for name, module in model.named_modules()}
    found = []
    for i in layers:
        block = stack[i]
        matches = [
            n for n, m in block.named_modules() if n.rsplit(".", 1)[-1] in DOWN_PROJECTIONS and "mlp" in n
        ]
        if len(matches) != 1:
            raise ValueError(
                f"cannot find the MLP down-projection of decoder layer {i} ({type(block).__name__}): "
                f"expected one module named one of {list(DOWN_PROJECTIONS)} under its mlp, found {matches}"
            )
        found.append(f"{names[id(block)]}.{matches[0]}")
    return found


@dataclass
class RmuSetting:
    """The steered layer ℓ and the direction ``c·u`` (``u`` drawn from ``seed``, fp32)."""

    layer: int
    steering: float
    hidden_size: int
    seed: int
    _targets: dict[torch.device, Tensor] = field(default_factory=dict, repr=False)

    def target(self, device: torch.device) -> Tensor:
        """``c·u/‖u‖`` ``[d]`` on ``device`` (drawn once, on the CPU, then kept per device)."""
        if device not in self._targets:
            u = torch.rand(self.hidden_size, generator=torch.Generator().manual_seed(self.seed))
            self._targets[device] = (self.steering * u / u.norm()).to(device)
        return self._targets[device]
