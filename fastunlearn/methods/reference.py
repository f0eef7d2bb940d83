"""The reference model (the model before unlearning) for the terms that run it at every step (KL, RMU),
computed by the trained model itself where the maths allows: with LoRA the adapters are switched off;
with FILA each LoRA layer adds its initial adapter ``s·B₀A₀x`` instead (``W_res + s·B₀A₀ = W``; on a
quantised base it cancels FILA's frozen ``−s·B₀A₀x`` hook); full fine-tuning keeps a frozen copy.

The adapters are switched by a per-call ``forward`` on each LoRA layer, so no ``requires_grad`` changes
and DDP, FSDP and DeepSpeed see one trainable set. The reference runs without gradients, in eval mode,
under the run's autocast.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from types import MethodType

import torch.nn.functional as F
from torch import Tensor, nn

from fastunlearn.fisher.fila import fila_record, lora_layers
from fastunlearn.methods.rmu import decoder_layers, forward_capturing
from fastunlearn.models.devices import eval_mode, model_device
from fastunlearn.models.patching import find_causal_lm
from fastunlearn.models.precision import autocast

KINDS = ("adapters_off", "initial_adapters", "copy")


class Reference:
    """The model before unlearning: ``kind`` ``"adapters_off"`` (LoRA), ``"initial_adapters"`` (FILA)
    or ``"copy"`` (``module`` is a frozen copy)."""

    def __init__(self, module: nn.Module, kind: str, precision: str = "fp32") -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown reference kind {kind!r}; expected one of {list(KINDS)}")
        self.module, self.kind, self.precision = module, kind, precision
        self._layers = (
            {} if kind == "copy" else {name: layer for _, (name, layer) in lora_layers(module).items()}
        )
        self._initial: dict[str, tuple[Tensor, Tensor, float]] = {}
        if kind != "copy" and not self._layers:
            raise ValueError(
                f"the {kind} reference needs a peft model with LoRA layers; {type(module).__name__} has none"
            )
        if kind == "initial_adapters":
            missing = [name for name, layer in self._layers.items() if fila_record(layer) is None]
            if missing:
                raise ValueError(
                    f"the FILA reference needs fila_init's record on every LoRA layer; missing: {missing}"
                )

    def hidden(self, part: Mapping[str, Tensor]) -> Tensor:
        """The reference's last hidden states ``[B, T, H]`` on ``part`` (the output head's input)."""
        with self.running() as module:
            return forward_capturing(
                module, find_causal_lm(module).get_output_embeddings(), part, inputs=True
            )

    def activations(self, part: Mapping[str, Tensor], layer: int) -> Tensor:
        """The reference's decoder layer ``layer`` output ``[B, T, d]`` on ``part``."""
        with self.running() as module:
            return forward_capturing(module, decoder_layers(module)[layer], part, inputs=False)

    @contextlib.contextmanager
    def running(self) -> Iterator[nn.Module]:
        """Inside the block, calling the yielded module computes the reference (no gradients, eval mode,
        the run's autocast)."""
        device = model_device(self.module)
        with eval_mode(self.module), autocast(self.precision, device), self._switched():
            yield self.module

    @contextlib.contextmanager
    def _switched(self) -> Iterator[None]:
        saved = {name: layer.__dict__.get("forward") for name, layer in self._layers.items()}
        try:
            for name, layer in self._layers.items():
                layer.forward = MethodType(self._reference_forward(name), layer)
            yield
        finally:
            for name, layer in self._layers.items():
                if saved[name] is None:
                    del layer.forward
                else:
                    layer.forward = saved[name]

    def _reference_forward(self, name: str):
        initial = self._initial_adapter(name) if self.kind == "initial_adapters" else None

        def forward(layer: nn.Module, x: Tensor, *args, **kwargs) -> Tensor:
            result = layer.base_layer(x, *args, **kwargs)
            if initial is None:
                return result
            A0, B0, scaling = initial
            # peft's LoRA term, with the recorded factors in place of the trained ones.
            return (result + F.linear(F.linear(x.to(A0.dtype), A0), B0) * scaling).to(result.dtype)

        return forward

    def _initial_adapter(self, name: str) -> tuple[Tensor, Tensor, float]:
        """FILA's ``(A₀, B₀, s)`` of a layer in its adapter's dtype and device (moved there once)."""
        if name not in self._initial:
            layer = self._layers[name]
            record, weight = fila_record(layer), layer.lora_A["default"].weight
            to = dict(device=weight.device, dtype=weight.dtype)
            self._initial[name] = (record.A0.to(**to), record.B0.to(**to), record.scaling)
        return self._initial[name]


def build_reference(model: nn.Module, init: str, precision: str = "fp32") -> Reference:
    """The reference of a run whose ``model`` was just initialised with ``init`` (``"lora"``, ``"fila"``
    or ``"full"``, which copies the model here, before training)."""
    if init == "full":
        # Tensors cloned by the dispatcher (not deep-copied storages): a copy made under the memory
        # plan's fake tensors stays in their mode.
        memo = {id(p): nn.Parameter(p.detach().clone(), requires_grad=False) for p in model.parameters()}
        memo |= {id(b): b.clone() for b in model.buffers()}
        return Reference(copy.deepcopy(model, memo), "copy", precision)
    return Reference(model, "initial_adapters" if init == "fila" else "adapters_off", precision)
