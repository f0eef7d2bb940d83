"""Unlearning objectives on a paired forget/retain batch (SPEC §2).

With ``NLL(D)`` the token-mean negative log-likelihood of the supervised (non ``-100``) shifted target
tokens of batch ``D`` (logits at ``t`` predict the token at ``t + 1``):

- ``ihl``: ``IHL(forget) + NLL(retain)`` — the paper's objective (Cha et al. 2025, Eq. 4), both
  weights 1, no KL term; the IHL term is :func:`fastunlearn.ihl_loss` (token mean over the batch), or
  with ``fused_linear=True`` :func:`fastunlearn.fused_linear_ihl_loss` on the decoder's last hidden
  states, so the forget batch's ``[B, T, V]`` logits are never materialised.
- ``ga``:  ``−NLL(forget)`` — gradient ascent (Jang et al. 2023).
- ``gd``:  ``−NLL(forget) + NLL(retain)`` — gradient difference.
- ``npo``: ``(2/β)·mean_i softplus(β·(log π_θ(y_i|x_i) − log π_ref(y_i|x_i))) + NLL(retain)`` — NPO
  (Zhang et al. 2024): ``softplus(β·Δ) = log(1 + (π_θ/π_ref)^β)``, with ``log π(y|x)`` the summed
  log-probability of the supervised tokens of sequence ``i``.

The NPO reference is the model *before unlearning*. Its sequence log-probabilities do not change
during training, so they are computed once, before the first step (:func:`sequence_logprobs`), and
travel with the batch as ``forget["ref_logp"]``. That needs no second copy of the model, and it is the
right reference for every initialisation: for FILA the base with adapters disabled is the *residual*
``W − s·B₀A₀``, not the model before unlearning, so ``disable_adapter()`` would be the wrong reference.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastunlearn.data import IGNORE_INDEX
from fastunlearn.ihl import ihl_loss
from fastunlearn.ihl_linear import fused_linear_ihl_loss
from fastunlearn.metrics import collect_answer_stats

METHODS = ("ihl", "ga", "gd", "npo")
NEEDS_RETAIN = frozenset({"ihl", "gd", "npo"})

__all__ = [
    "METHODS",
    "NEEDS_RETAIN",
    "method_loss",
    "nll_mean",
    "npo_loss",
    "sequence_logprob",
    "sequence_logprobs",
]


def _logits(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# Config fields of architectures whose logits are not simply output_embeddings(decoder(x)).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """The decoder stack and output embedding of a (possibly ``peft``-wrapped) causal LM.

    Only for models whose logits are exactly ``head(decoder(x).last_hidden_state)``; anything else is
    refused rather than silently given a different loss.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    transforms = [a for a in _LOGIT_TRANSFORMS if getattr(base.config, a, None) not in (None, 1, 1.0)]
    if decoder is None or type(head) is not nn.Linear or transforms:
        why = f"its logits are transformed ({', '.join(transforms)})" if transforms else (
            "it has no get_decoder() or its output embedding is not a plain nn.Linear (a LoRA-wrapped head?)"
        )
        raise ValueError(f"fused_linear=True is not supported for {type(base).__name__}: {why}")
    return decoder, head


def _forget_ihl(model: nn.Module, forget: Mapping[str, Tensor], backend: str, fused_linear: bool) -> Tensor:
    # Labels come from our own tokenisation, checked against the vocabulary once before training:
    # skip the per-step validation and its host sync.
    labels = forget["labels"][:, 1:]
    if not fused_linear:
        return ihl_loss(_logits(model, forget)[:, :-1], labels, backend=backend, validate=False)
    decoder, head = _decoder_and_head(model)
    hidden = decoder(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"]).last_hidden_state
    return fused_linear_ihl_loss(
        hidden[:, :-1], head.weight, labels, bias=head.bias, backend=backend, validate=False
    )


def _shifted_nll(logits: Tensor, labels: Tensor, reduction: str) -> Tensor:
    """NLL of each position's next token (fp32; fp64 for fp64 logits): the *labels* are shifted, so
    ``[B, T, V]`` logits flatten as a view instead of being copied by a ``logits[:, :-1]`` slice; the
    last position, which predicts nothing, gets the ignored label."""
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    z = logits.flatten(0, 1)
    return F.cross_entropy(
        z.to(torch.promote_types(z.dtype, torch.float32)), targets.flatten(), ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


def nll_mean(logits: Tensor, labels: Tensor) -> Tensor:
    """Token-mean NLL of the shifted, non-ignored targets of a batch (fp32; fp64 for fp64 logits)."""
    return _shifted_nll(logits, labels, "mean")


def sequence_logprob(logits: Tensor, labels: Tensor) -> Tensor:
    """``log π(y_i|x_i) = Σ_t log p(y_{i,t+1} | y_{i,≤t})`` over supervised targets, per row (fp32; fp64
    for fp64 logits)."""
    return -_shifted_nll(logits, labels, "none").view(labels.shape).sum(dim=1)


def npo_loss(logp: Tensor, ref_logp: Tensor, beta: float) -> Tensor:
    """``(2/β)·mean softplus(β·(logp − ref_logp))`` (NPO, Zhang et al. 2024, Eq. 3)."""
    return (2.0 / beta) * F.softplus(beta * (logp - ref_logp)).mean()


def sequence_logprobs(model: nn.Module, batches: Iterable[Mapping[str, Tensor]]) -> Tensor:
    """:func:`sequence_logprob` of every example of ``batches``, in eval mode, concatenated (on CPU):
    the negated summed answer NLL that :func:`fastunlearn.metrics.collect_answer_stats` measures."""
    return -collect_answer_stats(model, batches)["nll_sum"].cpu()


def method_loss(
    model: nn.Module,
    batch: Mapping[str, Mapping[str, Tensor]],
    method: str,
    *,
    npo_beta: float = 0.1,
    ihl_backend: str = "auto",
    fused_linear: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The objective of ``method`` on ``{"forget": ..., "retain": ...}`` and its detached parts.

    Each part is a batch of ``input_ids``, ``attention_mask``, ``labels``; NPO's forget part also
    carries ``ref_logp`` ``[B]``. ``fused_linear`` (IHL only) computes the forget term from the
    decoder's hidden states without the forget logits. Returns ``(loss, {"forget_loss": ...,
    "retain_loss": ...})``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {list(METHODS)}")
    if method in NEEDS_RETAIN and "retain" not in batch:
        raise ValueError(f"method {method!r} needs a retain set")
    forget = batch["forget"]
    if method == "ihl":
        forget_loss = _forget_ihl(model, forget, ihl_backend, fused_linear)
    elif method == "npo":
        if "ref_logp" not in forget:
            raise ValueError("method 'npo' needs the reference log-probabilities forget['ref_logp']")
        logp = sequence_logprob(_logits(model, forget), forget["labels"])
        forget_loss = npo_loss(logp, forget["ref_logp"], npo_beta)
    else:
        forget_loss = -nll_mean(_logits(model, forget), forget["labels"])
    parts = {"forget_loss": forget_loss.detach()}
    loss = forget_loss
    if method in NEEDS_RETAIN:
        retain = batch["retain"]
        retain_loss = nll_mean(_logits(model, retain), retain["labels"])
        parts["retain_loss"] = retain_loss.detach()
        loss = loss + retain_loss
    return loss, parts
