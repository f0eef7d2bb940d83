"""The forget and retain terms of the unlearning objectives, each computed by the patched model.

A batch holds the parts ``forget``, ``retain`` and ``idk`` (each forget question with a refusal
answer); ``ref_logp`` rides on the parts whose reference log-probabilities were taken once. Forget
terms: ``ihl``, ``ga`` (``−NLL(forget)``), ``npo``, ``simnpo``, ``idk`` (``NLL(idk)``), ``dpo`` (idk
preferred over forget), ``rmu``; retain terms: ``nll``, ``kl`` (every position, padding included, as
TOFU's) / ``kl_targets`` (the targets only), ``rmu``. Their formulas are :mod:`fastunlearn.ops.preference`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from torch import Tensor, nn

from fastunlearn.methods.capture import decoder_layers, forward_capturing
from fastunlearn.models.patching import LossType
from fastunlearn.ops import IGNORE_INDEX
from fastunlearn.ops.nll import shift_labels
from fastunlearn.ops.preference import dpo_loss, npo_loss, rmu_loss, simnpo_loss

if TYPE_CHECKING:
    from fastunlearn.methods.objectives import Objective

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
