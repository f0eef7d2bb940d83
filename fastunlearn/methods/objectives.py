"""The unlearning objective of a training step: ``γ·forget_term + α·retain_term`` on a paired batch.

A batch holds the parts ``forget``, ``retain`` and ``idk`` (each forget question with a refusal answer).
Every term is computed by the model patched with :func:`fastunlearn.patch` (their formulas are
:mod:`fastunlearn.ops.preference`'s); the memory plan and ``Trainer`` run this same call. The ``kl``
retain term covers every position, padding included, as TOFU's; ``kl_targets`` the targets only. IdK
with the NLL retain term is one token mean over both batches, as TOFU's idk concatenates them:
``−(γ·Σ S_θ(idk) + α·Σ S_θ(retain)) / (Σ n(idk) + Σ n(retain))``.

The reference is the model before unlearning. NPO's and DPO's reference log-probabilities are taken
once, before the first step, and ride on the batch as ``part["ref_logp"]``: no copy of the model is
needed, because right after initialisation the model *is* the model before unlearning (LoRA's ``B = 0``;
FILA's ``W_res + s·B₀A₀ = W``). The terms that run the reference at every step (KL, RMU) have it
computed by the trained model itself where the maths allows: with LoRA the adapters are switched off;
with FILA each LoRA layer adds its initial adapter ``s·B₀A₀x`` instead (on a quantised base it cancels
FILA's frozen ``−s·B₀A₀x`` hook); full fine-tuning keeps a frozen copy. The adapters are switched by a
per-call ``forward`` on each LoRA layer, so no ``requires_grad`` changes and DDP, FSDP and DeepSpeed see
one trainable set. The reference runs without gradients, in eval mode, under the run's autocast.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MethodType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastunlearn.fisher.fila import fila_record, lora_layers
from fastunlearn.methods import MethodSpec
from fastunlearn.methods.rmu import RmuSetting, decoder_layers, resolve_rmu_layers
from fastunlearn.models.devices import autocast, eval_mode, model_device
from fastunlearn.models.patching import LossType, find_causal_lm, is_patched
from fastunlearn.ops import IGNORE_INDEX
from fastunlearn.ops.nll import shift_labels
from fastunlearn.ops.preference import dpo_loss, npo_loss, rmu_loss, simnpo_loss

_PART_NAMES = {
    "forget": "a forget batch",
    "idk": "the refusal answers batch['idk']",
    "retain": "a retain set",
}


def _require_patched(model: nn.Module) -> None:
    if not is_patched(model):
        raise ValueError(
            "the unlearning losses are computed by the patched model: call fastunlearn.patch(model) first "
            "(fused=False for the logits path)"
        )


Part = Mapping[str, Tensor]
Term = Callable[["Objective", nn.Module, Mapping[str, Part]], Tensor]


def model_loss(model: nn.Module, part: Part, loss_type: LossType, **extra: Tensor) -> Tensor:
    """The ``loss_type`` term of one batch part, computed by the patched model's own forward."""
    return model(
        input_ids=part["input_ids"],
        attention_mask=part["attention_mask"],
        labels=part["labels"],
        loss_type=loss_type,
        **extra,
    ).loss


def forward_capturing(model: nn.Module, module: nn.Module, part: Part, *, inputs: bool) -> Tensor:
    """``module``'s first input (``inputs=True``) or its output's first tensor, from one patched NLL call
    of ``model`` on ``part``; the loss is dropped. ``RuntimeError`` unless ``module`` ran exactly once.
    The hook keeps it during the call (which forms no logits on the fused path), so wrappers' hooks,
    autocast and gradient checkpointing apply as in training."""
    kept: list[Tensor] = []

    def keep_input(_module, args):
        kept.append(args[0])

    def keep_output(_module, _args, output):
        kept.append(output[0] if isinstance(output, tuple) else output)

    hook = (
        module.register_forward_pre_hook(keep_input) if inputs else module.register_forward_hook(keep_output)
    )
    try:
        model_loss(model, part, "nll")
    finally:
        hook.remove()
    if len(kept) != 1:
        raise RuntimeError(f"{type(module).__name__} ran {len(kept)} times in one forward, not once")
    return kept[0]


def _targets(part: Part) -> Tensor:
    """``[B, T]``: the positions whose shifted label is a target."""
    return shift_labels(part["labels"]) != IGNORE_INDEX


def target_counts(part: Part) -> Tensor:
    """``n(x)`` ``[B]``: the target tokens of each sequence (on the batch's device, no sync)."""
    return _targets(part).sum(-1)


def _layer_output(objective: Objective, model: nn.Module, part: Part) -> Tensor:
    return forward_capturing(model, decoder_layers(model)[objective.rmu.layer], part, inputs=False)


def _npo(o: Objective, model: nn.Module, batch: Mapping[str, Part]) -> Tensor:
    forget = batch["forget"]
    return npo_loss(model_loss(model, forget, "seq_logprob"), forget["ref_logp"], o.spec.beta)


def _simnpo(o: Objective, model: nn.Module, batch: Mapping[str, Part]) -> Tensor:
    forget = batch["forget"]
    logp = model_loss(model, forget, "seq_logprob")
    return simnpo_loss(logp, target_counts(forget), o.spec.beta, o.spec.delta)


def _dpo(o: Objective, model: nn.Module, batch: Mapping[str, Part]) -> Tensor:
    chosen, rejected = batch["idk"], batch["forget"]
    return dpo_loss(
        model_loss(model, chosen, "seq_logprob"), chosen["ref_logp"],
        model_loss(model, rejected, "seq_logprob"), rejected["ref_logp"], o.spec.beta,
    )  # fmt: skip


def _rmu_forget(o: Objective, model: nn.Module, batch: Mapping[str, Part]) -> Tensor:
    forget = batch["forget"]
    hidden = _layer_output(o, model, forget)
    return rmu_loss(hidden, o.rmu.target(hidden.device), _targets(forget))


def _kl(loss_type: LossType) -> Term:
    def term(o: Objective, model: nn.Module, batch: Mapping[str, Part]) -> Tensor:
        retain = batch["retain"]
        return model_loss(model, retain, loss_type, ref_hidden=o.reference.hidden(retain))

    return term


def _rmu_retain(o: Objective, model: nn.Module, batch: Mapping[str, Part]) -> Tensor:
    retain = batch["retain"]
    reference = o.reference.activations(retain, o.rmu.layer)
    return rmu_loss(_layer_output(o, model, retain), reference, _targets(retain))


FORGET: dict[str, Term] = {
    "ihl": lambda o, model, batch: model_loss(model, batch["forget"], "ihl"),
    "ga": lambda o, model, batch: -model_loss(model, batch["forget"], "nll"),
    "npo": _npo,
    "simnpo": _simnpo,
    "idk": lambda o, model, batch: model_loss(model, batch["idk"], "nll"),
    "dpo": _dpo,
    "rmu": _rmu_forget,
}
RETAIN: dict[str, Term] = {
    "nll": lambda o, model, batch: model_loss(model, batch["retain"], "nll"),
    "kl": _kl("kl"),
    "kl_targets": _kl("kl_targets"),
    "rmu": _rmu_retain,
}


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
        saved = {name: layer.__dict__.get("forward") for name, layer in self._layers.items()}
        try:
            for name, layer in self._layers.items():
                layer.forward = MethodType(self._reference_forward(name), layer)
            with eval_mode(self.module), autocast(self.precision, model_device(self.module)):
                yield self.module
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


@dataclass
class Objective:
    """The loss of a training step. ``reference``: for the ``kl``, ``kl_targets`` and ``rmu`` retain
    terms; ``rmu``: for the ``rmu`` terms."""

    spec: MethodSpec
    reference: Reference | None = None
    rmu: RmuSetting | None = None

    def __post_init__(self) -> None:
        if self.spec.step_reference and self.reference is None:
            raise ValueError(f"the {self.spec.retain!r} retain term needs the reference model (reference=)")
        if self.spec.uses_rmu and self.rmu is None:
            raise ValueError("the rmu terms need RMU's layer and steering direction (rmu=)")

    def __call__(
        self, model: nn.Module, batch: Mapping[str, Mapping[str, Tensor]]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(loss, {"forget_loss": γ·forget term, "retain_loss": α·retain term})``, the parts detached
        (they sum to the loss)."""
        self._check(model, batch)
        spec = self.spec
        if spec.pooled:
            forget, retain = self._pooled(model, batch)
        else:
            forget = spec.forget_weight * FORGET[spec.forget](self, model, batch)
            retain = (
                spec.retain_weight * RETAIN[spec.retain](self, model, batch) if spec.needs_retain else None
            )
        if retain is None:
            return forget, {"forget_loss": forget.detach()}
        return forget + retain, {"forget_loss": forget.detach(), "retain_loss": retain.detach()}

    def _pooled(self, model: nn.Module, batch: Mapping[str, Mapping[str, Tensor]]) -> tuple[Tensor, Tensor]:
        idk, retain = batch["idk"], batch["retain"]
        tokens = (target_counts(idk).sum() + target_counts(retain).sum()).clamp_min(1)
        forget = -self.spec.forget_weight * model_loss(model, idk, "seq_logprob").sum() / tokens
        return forget, -self.spec.retain_weight * model_loss(model, retain, "seq_logprob").sum() / tokens

    def _check(self, model: nn.Module, batch: Mapping[str, Mapping[str, Tensor]]) -> None:
        spec = self.spec
        missing = [_PART_NAMES[part] for part in spec.parts if part not in batch]
        if missing:
            raise ValueError(f"{spec.forget} + {spec.retain} needs {', '.join(missing)}")
        for part in spec.fixed_reference:
            if "ref_logp" not in batch[part]:
                raise ValueError(
                    f"the {spec.forget!r} forget term needs the reference log-probabilities "
                    f"{part}['ref_logp']"
                )
        _require_patched(model)


def build_objective(
    spec: MethodSpec,
    model: nn.Module,
    *,
    init: str,
    precision: str = "fp32",
    rmu_layer: int | None = None,
    rmu_steering: float = 6.5,
    seed: int = 0,
) -> Objective:
    """The objective of a run whose ``model`` was just initialised with ``init``, with its reference
    (full fine-tuning copies the model now) and RMU's setting where its terms need them."""
    reference = build_reference(model, init, precision) if spec.step_reference else None
    rmu = None
    if spec.uses_rmu:
        config = find_causal_lm(model).config
        layer, _ = resolve_rmu_layers(config, rmu_layer, None)
        rmu = RmuSetting(layer, rmu_steering, config.hidden_size, seed)
    return Objective(spec, reference, rmu)


def sequence_logprobs(model: nn.Module, batches: Iterable[Mapping[str, Tensor]]) -> Tensor:
    """``S(x)`` of every example of ``batches`` (fp32, on the CPU), in eval mode without gradients:
    NPO's and DPO's fixed reference, computed as the training step computes the policy's."""
    _require_patched(model)
    device = model_device(model)
    parts = []
    with eval_mode(model):
        for batch in batches:
            part = {key: batch[key].to(device) for key in ("input_ids", "attention_mask", "labels")}
            parts.append(model_loss(model, part, "seq_logprob").float())
    if not parts:
        raise ValueError("no batches to compute the reference log-probabilities of: the data set is empty")
    return torch.cat(parts).cpu()
