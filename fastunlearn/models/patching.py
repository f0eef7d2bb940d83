"""Unlearning losses inside a causal LM's own forward: ``fastunlearn.patch(model)``.

After ``patch(model)``, ``model(input_ids=..., labels=..., loss_type=...)`` (labels aligned with
``input_ids``, ``-100`` without a loss) returns ``out.loss`` and ``out.logits is None``. Loss types:
``"ihl"`` / ``"nll"`` (mean over the shifted targets), ``"seq_logprob"`` (``[B]`` sums of target
log-probabilities), ``"kl"`` / ``"kl_targets"`` (``KL(P_ref ‖ P_θ)`` over every position, padding
included as TOFU's, or over the targets; ``ref_hidden=`` the reference's ``[B, T, H]`` last hidden
states, put through the shared frozen head).

The loss is computed by the output head's own call (its ``forward`` swapped for that call only), so the
hooks of DDP / FSDP / DeepSpeed and accelerate's autocast apply and the ``[B, T, V]`` logits never exist.
A model whose logits may not be ``head(last_hidden_state)`` (:func:`fused_blocker`) takes the logits
path with one warning (an error under ``fused=True``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import MethodType
from typing import Any, Literal

import torch
from torch import Tensor, nn

from fastunlearn.engines.distributed import is_partitioned
from fastunlearn.ops import IGNORE_INDEX
from fastunlearn.ops._backend import BACKENDS, Backend
from fastunlearn.ops.fused_linear import fused_linear_ihl_loss, fused_linear_nll_loss
from fastunlearn.ops.ihl import ihl_loss, nll_loss
from fastunlearn.ops.kl import fused_linear_kl_loss, kl_loss
from fastunlearn.ops.nll import shift_labels

LossType = Literal["ihl", "nll", "seq_logprob", "kl", "kl_targets"]
# loss type -> (row loss, reduction)
_LOSSES = {"ihl": ("ihl", "mean"), "nll": ("nll", "mean"), "seq_logprob": ("nll", "none"),
           "kl": ("kl", "mean"), "kl_targets": ("kl", "mean")}  # fmt: skip
LOSS_TYPES = tuple(_LOSSES)

# Architectures (``config.model_type``) whose logits are ``head(last hidden states)`` with nothing after
# the head unless one of LOGIT_TRANSFORMS is set (Gemma-2's soft-capping, Cohere's scale, Granite's
# scaling, MiniCPM's multiplier: anything but None/1 takes the logits path). tests/test_patching.py
# checks each family against the logits path.
FUSED_FAMILIES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gpt_neox", "gpt_neo", "gpt2", "gemma", "gemma2"}
)
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")

_STATE = "_fastunlearn_patch"


@dataclass
class _PatchState:
    fused: bool | None
    backend: str
    chunk_rows: int | None
    validate: bool
    previous_forward: Callable[..., Any] | None  # the instance's own `forward` attribute, if it had one
    function: Callable[..., Any]  # the patched forward's function, to recognise it on unpatch
    warned: str | None = None  # the reason of the last fallback warning, so it is given once


def find_causal_lm(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM inside ``model``: ``model`` itself, or under a peft ``PeftModel``,
    DDP / FSDP / DeepSpeed / ``DataParallel`` (``.module``) or ``torch.compile`` (``._orig_mod``)."""
    found = model
    for _ in range(16):  # wrappers nest a few levels at most
        if hasattr(found, "get_base_model"):  # peft: the transformers model with the adapters injected
            found = found.get_base_model()
            continue
        # Unwrap before testing for a causal LM: FSDP and DeepSpeed forward attribute lookups to the
        # module they wrap, so the wrapper itself would pass for one.
        inner = getattr(found, "module", None)
        inner = inner if isinstance(inner, nn.Module) else getattr(found, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            break
        found = inner
    if (
        isinstance(found, nn.Module)
        and hasattr(found, "config")
        and callable(getattr(found, "get_output_embeddings", None))
    ):
        return found
    raise TypeError(
        f"found no causal language model (a module with a config and get_output_embeddings()) in "
        f"{type(model).__name__}"
    )


def _head_linears(head: nn.Module | None) -> list[nn.Linear] | None:
    """The plain ``nn.Linear`` modules the output head's call ends in: the head itself, or for peft's
    ``modules_to_save`` wrapper its original and its trained copies; ``None`` for anything else."""
    if type(head) is nn.Linear:
        return [head]
    if isinstance(getattr(head, "modules_to_save", None), nn.ModuleDict) and hasattr(head, "original_module"):
        linears = [head.original_module, *head.modules_to_save.values()]
        if all(type(m) is nn.Linear for m in linears):
            return linears
    return None


def _logit_transforms(config: Any) -> list[str]:
    return [name for name in LOGIT_TRANSFORMS if getattr(config, name, None) not in (None, 1, 1.0)]


def fused_blocker(model: nn.Module) -> str | None:
    """Why the fused path cannot compute ``model``'s losses (``None`` when it can)."""
    lm = find_causal_lm(model)
    config = lm.config
    family = getattr(config, "model_type", None)
    if family not in FUSED_FAMILIES:
        return (
            f"model type {family!r} is not one whose logits are known to be the output head applied to the "
            f"last hidden states ({', '.join(sorted(FUSED_FAMILIES))})"
        )
    transforms = _logit_transforms(config)
    if transforms:
        return f"its logits are transformed after the output head ({', '.join(transforms)})"
    if (getattr(config, "pretraining_tp", None) or 1) > 1:
        return "pretraining_tp > 1 computes the logits from slices of the output head"
    head = lm.get_output_embeddings()
    if _head_linears(head) is None:
        return f"its output head is a {type(head).__name__}, not a plain nn.Linear (LoRA on the head?)"
    if is_partitioned(head.weight):  # read outside the head's forward, where ZeRO-3 would fetch it
        return "its output head's weight is partitioned (DeepSpeed ZeRO-3)"
    return None


def patch(
    model: nn.Module,
    *,
    fused: bool | None = None,
    backend: Backend = "auto",
    chunk_rows: int | None = None,
    validate: bool = True,
) -> nn.Module:
    """Make the causal LM in ``model`` (bare, under peft and/or DDP / FSDP / DeepSpeed, before or after
    wrapping) compute unlearning losses in its forward (module docstring); returns ``model``.

    ``fused``: ``None``, fused where supported, else the logits path with one warning; ``True``, fused
    or a ``ValueError``; ``False``, always the logits path. ``backend`` as in :func:`fastunlearn.ihl_loss`.
    ``chunk_rows``: tokens per chunk of the fused path. ``validate``: check every batch's labels against
    the vocabulary (one host synchronisation). Patching a patched model replaces its options.
    """
    if fused not in (None, True, False):
        raise ValueError(f"fused must be None, True or False, got {fused!r}")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    lm = find_causal_lm(model)
    # A bad name fails here; whether the backend runs where the model is is checked at each call.
    backends = tuple(b for b in BACKENDS if b != "reference")
    if backend not in backends:
        raise ValueError(f"unknown backend {backend!r}; expected one of {backends}")
    if fused:
        reason = fused_blocker(lm)
        if reason is not None:
            raise ValueError(f"fused=True: cannot compute the loss of {type(lm).__name__} fused: {reason}")
    old = lm.__dict__.get(_STATE)
    if old is not None:
        state = _PatchState(fused, backend, chunk_rows, validate, old.previous_forward, old.function)
    else:
        previous = lm.__dict__.get("forward")
        state = _PatchState(fused, backend, chunk_rows, validate, previous, _make_forward(previous))
        lm.forward = MethodType(state.function, lm)
    lm.__dict__[_STATE] = state
    if fused is None:
        _warn_fallback(lm, state)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch` and return ``model``. If something wrapped the patched ``forward`` since
    (accelerate does), that wrapper stays and the patch becomes a pass-through."""
    lm = find_causal_lm(model)
    state = lm.__dict__.pop(_STATE, None)
    if state is not None and getattr(lm.__dict__.get("forward"), "__func__", None) is state.function:
        if state.previous_forward is None:
            del lm.forward
        else:
            lm.forward = state.previous_forward
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether the causal LM in ``model`` is patched (takes ``loss_type``)."""
    return _STATE in find_causal_lm(model).__dict__


def takes_fused_path(model: nn.Module) -> bool:
    """Whether a loss of ``model`` computed outside a ``loss_type`` call (a Fisher pass, teacher-forced
    evaluation) takes the fused path: wherever :func:`fused_blocker` allows, unless patched with
    ``fused=False``. ``False`` for a module that is not a causal LM."""
    try:
        lm = find_causal_lm(model)
    except TypeError:
        return False
    state = lm.__dict__.get(_STATE)
    return (state is None or state.fused is not False) and fused_blocker(lm) is None


def head_computes(
    model: nn.Module, targets: Tensor, compute: Callable[[Tensor, nn.Linear], Tensor], call: Callable[[], Any]
) -> Any:
    """``call()`` (a forward of ``model``) with the output head computing ``compute(hidden, head)`` from
    its ``[B, T, H]`` hidden states instead of the logits, which the output carries as its ``logits``.
    The head runs through its ``__call__`` (hooks, autocast), exactly once, with hidden states shaped
    like ``targets``. ``ValueError`` for a model :func:`fused_blocker` refuses."""
    lm = find_causal_lm(model)
    reason = fused_blocker(lm)
    if reason is not None:
        raise ValueError(f"cannot compute at the output head of {type(lm).__name__}: {reason}")
    head = lm.get_output_embeddings()
    calls = 0

    def head_forward(linear: nn.Linear, hidden: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise RuntimeError(
                "the output head was called more than once in one forward; its loss cannot be fused"
            )
        if tuple(hidden.shape[:-1]) != tuple(targets.shape):
            raise ValueError(
                f"the output head received hidden states of shape {tuple(hidden.shape)}, not [B, T, H] for "
                f"labels {tuple(targets.shape)}"
            )
        return compute(hidden, linear)

    linears = _head_linears(head)
    saved = [m.__dict__.get("forward") for m in linears]  # instance attributes, restored after the call
    try:
        for m in linears:
            m.forward = MethodType(head_forward, m)
        out = call()
    finally:
        for m, previous in zip(linears, saved):
            if previous is None:
                del m.forward
            else:
                m.forward = previous
    if calls != 1:
        raise RuntimeError(
            f"{type(lm).__name__}.forward called its output head {calls} times instead of once; "
            "its losses cannot be fused (patch it with fused=False)"
        )
    return out


def _warn_fallback(lm: nn.Module, state: _PatchState) -> None:
    reason = fused_blocker(lm)
    if reason is not None and reason != state.warned:
        state.warned = reason
        warnings.warn(
            f"fastunlearn: the losses of {type(lm).__name__} take the logits path (the [B, T, V] logits are "
            f"materialised): {reason}",
            UserWarning,
            stacklevel=3,
        )


def _make_forward(previous: Callable[..., Any] | None) -> Callable[..., Any]:
    def forward(self, *args, loss_type: LossType | None = None, **kwargs):
        call = previous if previous is not None else MethodType(type(self).forward, self)
        state = self.__dict__.get(_STATE)
        if loss_type is None:
            return call(*args, **kwargs)
        if state is None:
            raise ValueError("loss_type needs fastunlearn.patch(model); the model was unpatched")
        return _loss_forward(self, state, call, loss_type, args, kwargs)

    return forward


def _loss_forward(lm: nn.Module, state: _PatchState, call, loss_type: str, args, kwargs) -> Any:
    if loss_type not in _LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    labels, ref_hidden = kwargs.pop("labels", None), kwargs.pop("ref_hidden", None)
    if not isinstance(labels, Tensor) or labels.dim() != 2:
        raise ValueError(
            f"loss_type={loss_type!r} needs labels of shape [batch, sequence] (aligned with input_ids)"
        )
    _check_ref_hidden(loss_type, ref_hidden, labels)
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if kwargs.get(name):
            raise ValueError(f"loss_type={loss_type!r} uses every position; {name} must not be set")
    as_tuple = kwargs.get("return_dict") is False
    kwargs["return_dict"] = True
    kwargs.setdefault("use_cache", False)
    targets = shift_labels(labels)
    blocker = "fused=False" if state.fused is False else fused_blocker(lm)
    if blocker is None:

        def compute(hidden: Tensor, head: nn.Linear) -> Tensor:
            return _fused_loss(hidden, head, targets.to(hidden.device), loss_type, state, ref_hidden)

        out = head_computes(lm, targets, compute, lambda: call(*args, **kwargs))
        loss = out.logits
    else:
        if state.fused:
            raise ValueError(f"fused=True: cannot compute the loss of {type(lm).__name__} fused: {blocker}")
        if state.fused is None:
            _warn_fallback(lm, state)
        out = call(*args, **kwargs)
        loss = _loss_from_logits(out.logits, targets, loss_type, state, lm, ref_hidden)
    fields = {key: value for key, value in out.items() if key not in ("loss", "logits")}
    result = type(out)(loss=loss, **fields)
    return result.to_tuple() if as_tuple else result


def _check_ref_hidden(loss_type: str, ref_hidden: Any, labels: Tensor) -> None:
    if _LOSSES[loss_type][0] != "kl" and ref_hidden is not None:
        raise ValueError(f"ref_hidden is for loss_type 'kl' and 'kl_targets', not {loss_type!r}")
    if _LOSSES[loss_type][0] == "kl" and not (isinstance(ref_hidden, Tensor) and ref_hidden.dim() == 3
                                              and ref_hidden.shape[:2] == labels.shape):  # fmt: skip
        raise ValueError(
            f"loss_type={loss_type!r} needs ref_hidden=, the reference model's last hidden states "
            f"[batch, sequence, hidden] for labels {tuple(labels.shape)}"
        )


def _kl_mask(loss_type: str, targets: Tensor) -> Tensor | None:
    """``None`` (every position) for ``"kl"``, the positions with a shifted target for ``"kl_targets"``."""
    return targets != IGNORE_INDEX if loss_type == "kl_targets" else None


def _fused_loss(hidden: Tensor, head: nn.Linear, targets: Tensor, loss_type: str, state: _PatchState,
                ref_hidden: Tensor | None) -> Tensor:  # fmt: skip
    kind, reduction = _LOSSES[loss_type]
    if kind == "kl":
        return fused_linear_kl_loss(
            hidden, ref_hidden.to(hidden.device), head.weight, _kl_mask(loss_type, targets), head.bias,
            backend=state.backend, chunk_rows=state.chunk_rows,
        )  # fmt: skip
    fn = fused_linear_ihl_loss if kind == "ihl" else fused_linear_nll_loss
    value = fn(
        hidden, head.weight, targets, bias=head.bias, reduction=reduction, backend=state.backend,
        chunk_rows=state.chunk_rows, validate=state.validate,
    )  # fmt: skip
    return -value.sum(-1) if loss_type == "seq_logprob" else value


def _loss_from_logits(logits: Tensor, targets: Tensor, loss_type: str, state: _PatchState, lm: nn.Module,
                      ref_hidden: Tensor | None) -> Tensor:  # fmt: skip
    kind, reduction = _LOSSES[loss_type]
    targets = targets.to(logits.device)
    if kind == "kl":
        # The reference logits are head(ref_hidden) only where nothing transforms the head's output.
        transforms = _logit_transforms(lm.config)
        if transforms:
            raise ValueError(
                f"loss_type 'kl' forms the reference logits as head(ref_hidden), but {type(lm).__name__} "
                f"transforms its logits after the head ({', '.join(transforms)})"
            )
        with torch.no_grad():
            ref_logits = lm.get_output_embeddings()(ref_hidden.to(logits.device))
        return kl_loss(logits, ref_logits, _kl_mask(loss_type, targets), backend=state.backend)
    fn = ihl_loss if kind == "ihl" else nll_loss
    value = fn(logits, targets, reduction=reduction, backend=state.backend, validate=state.validate)
    return -value.sum(-1) if loss_type == "seq_logprob" else value
