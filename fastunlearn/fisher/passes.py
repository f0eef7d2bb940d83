"""One pass of a data set through a model, folding ``Σ_n (G_nᵀ X_n)²`` of chosen linear layers into
accumulators (``X_n``, ``G_n``: example ``n``'s layer inputs and output gradients; ``g_n = G_nᵀ X_n``).

A forward hook passes each measured layer's output through :class:`_Tap`, an identity autograd function
that saves ``X`` and, in its backward, folds ``(X, G)`` with :func:`fastunlearn.per_example_grad_sq`:
one backward of the summed loss gives every ``G_n``, each layer is counted once per forward whatever
recomputes it (checkpointing re-runs the tap outside the graph), and no weight gradient is formed.
The weights are frozen, so a tap whose output needs no gradient takes a 0-d *anchor* that does, and
the input embeddings' output is detached: the backward stops at the lowest measured layer. A pass runs
in eval mode (no dropout) and checkpoints the decoder layers itself.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fastunlearn.engines import distributed
from fastunlearn.engines.distributed import is_partitioned, linear_shape
from fastunlearn.models.devices import model_device
from fastunlearn.models.naming import unwrap_model
from fastunlearn.models.patching import find_causal_lm, head_computes, takes_fused_path
from fastunlearn.ops import IGNORE_INDEX
from fastunlearn.ops.fused_linear import fused_linear_nll_loss
from fastunlearn.ops.grad_sq import per_example_grad_sq
from fastunlearn.ops.nll import shift_labels, shifted_nll

_MODEL_KEYS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")


@dataclass(frozen=True)
class Batch:
    """A checked batch: the caller's mapping, its labels, and its label-token and example counts."""

    inputs: Mapping[str, Any]
    labels: Tensor
    tokens: int  # c_b: label tokens (positions t whose logit predicts labels[t+1])
    examples: int  # sequences with at least one label token


@dataclass(frozen=True)
class Data:
    """A data set's batches, checked and kept so that every group of layers sees the same batches."""

    batches: list[Batch]
    num_examples: int
    num_tokens: int


def _check_batch(batch: Any, where: str) -> Batch:
    if not isinstance(batch, Mapping):
        raise TypeError(f"{where} must be a mapping with input_ids and labels, got {type(batch).__name__}")
    for key in ("input_ids", "labels"):
        if key not in batch or not isinstance(batch[key], Tensor):
            raise ValueError(
                f"{where} has no {key!r} tensor (keys: {sorted(batch)}); Fisher estimation needs "
                "input_ids and labels (-100 at positions without a loss)"
            )
    input_ids, labels = batch["input_ids"], batch["labels"]
    if input_ids.dim() != 2 or labels.shape != input_ids.shape:
        raise ValueError(
            f"{where}: input_ids and labels must both be [batch, tokens]; got {tuple(input_ids.shape)} "
            f"and {tuple(labels.shape)}"
        )
    if labels.is_floating_point():
        raise TypeError(f"{where}: labels must be integer token ids, got {labels.dtype}")
    valid = shift_labels(labels) != IGNORE_INDEX  # the logit at t predicts t+1
    return Batch(batch, labels, int(valid.sum()), int(valid.any(dim=1).sum()))


def prepare_batches(batches: Iterable[Mapping[str, Any]], name: str | None = None) -> Data:
    """Check every batch and keep them (token ids), before any compute: a pass runs once per group of
    layers, and an iterable may be a one-shot generator or a reshuffling loader. ``ValueError`` for no
    batches or no label; ``name`` ("forget") names the data set in the messages."""
    of = f" of the {name} set" if name else ""
    checked = [_check_batch(batch, f"batch {index}{of}") for index, batch in enumerate(batches)]
    if not checked:
        raise ValueError(f"got no batches{of}")
    num_tokens = sum(b.tokens for b in checked)
    if num_tokens == 0:
        raise ValueError(
            f"every label in the batches{of} is -100: there is no token to measure the Fisher on"
        )
    return Data(checked, sum(b.examples for b in checked), num_tokens)


class _Tap(torch.autograd.Function):
    """Identity on a layer's output; its backward hands ``(X, G)`` to ``fold`` (module docstring)."""

    @staticmethod
    def forward(ctx, output: Tensor, inputs: Tensor, anchor: Tensor | None, fold: Callable) -> Tensor:
        ctx.save_for_backward(inputs)
        ctx.fold = fold
        # A detached alias, not `output` itself: an input returned as-is would become a view whose
        # in-place modification (by the model's code) autograd forbids for custom functions.
        return output.detach()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        (inputs,) = ctx.saved_tensors
        ctx.fold(inputs, grad)
        return (grad if ctx.needs_input_grad[0] else None), None, None, None


class _Folder:
    """The forward hooks of one pass and the fold of ``(X, G)`` into the accumulators ``sums``."""

    def __init__(self, layers: Mapping[str, nn.Linear], mode: str, backend: str, anchor: Tensor) -> None:
        self.layers = layers
        # Made at a layer's first output gradient, as `.grad` is, not at the forward's peak.
        self.sums: dict[str, Tensor] = {}
        self.mode = mode
        self.backend = backend
        self.anchor = anchor
        self.batch_size = 0
        self.batch_weight = 1.0
        self.in_forward = False
        self.calls: dict[str, int] = {}
        self.folding = True  # False: a dry pass, or one only to take part in ZeRO-3's collectives

    def start_batch(self, batch: Batch) -> None:
        self.batch_size = batch.labels.shape[0]
        # mode="batch": the gradient of the token mean, weighted so that its square carries c_b.
        self.batch_weight = math.sqrt(max(batch.tokens, 1))
        self.calls = dict.fromkeys(self.layers, 0)
        self.in_forward = True

    def hook(self, name: str, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        """Layer ``name``'s forward hook: its output through a :class:`_Tap`."""
        if not torch.is_grad_enabled():
            return None
        if self.in_forward:  # recomputations run in the backward and are not counted
            self.calls[name] += 1
            if self.calls[name] > 1:
                raise ValueError(
                    f"layer {name!r} ran more than once in one forward pass (shared weights); its "
                    "per-example gradient is a sum over calls, which is not supported"
                )
        if not args or not isinstance(args[0], Tensor):
            raise ValueError(f"layer {name!r} was called without a positional input tensor")
        x = args[0].detach()
        if x.dim() < 2 or x.shape[0] != self.batch_size:
            raise ValueError(
                f"layer {name!r} received inputs of shape {tuple(x.shape)}; per-example Fisher needs "
                f"the batch ({self.batch_size} examples) as the leading dimension"
            )
        anchor = None if output.requires_grad else self.anchor
        return _Tap.apply(output, x, anchor, functools.partial(self.fold, name))

    def fold(self, name: str, x: Tensor, grad: Tensor) -> None:
        if not self.folding:
            return
        B = x.shape[0]
        inputs = x.reshape(B, -1, x.shape[-1])
        grads = grad.reshape(B, -1, grad.shape[-1])
        if self.mode == "batch":  # one "example": the whole batch, its gradient weighted by sqrt(c_b)
            inputs = inputs.reshape(1, -1, inputs.shape[-1])
            grads = grads.reshape(1, -1, grads.shape[-1])
            grads = grads.to(torch.promote_types(grads.dtype, torch.float32)) * self.batch_weight
        elif self.mode == "token":  # every token its own "example"
            inputs, grads = inputs.reshape(-1, inputs.shape[-1]), grads.reshape(-1, grads.shape[-1])
        if name not in self.sums:
            self.sums[name] = _zeros(self.layers[name])
        per_example_grad_sq(inputs, grads, self.sums[name], backend=self.backend)


def _batch_loss(model: nn.Module, batch: Batch, mode: str, fused: bool) -> Tensor:
    """The loss whose backward yields the wanted ``G``: ``Σ_n L_n`` (``L_n`` example n's summed token
    NLL), or for ``mode="batch"`` the token mean ``L̄_b`` as the paper's code differentiates it (the fold
    scales its gradients by ``sqrt(c_b)`` so the square is ``c_b·(∇L̄_b)²``). ``fused``: computed at the
    output head from the last hidden states (:func:`fastunlearn.fused_linear_nll_loss`), else from the
    logits; its rows are tokens, so each example still gets its own ``G_n``."""
    device = model_device(model)
    inputs: dict[str, Any] = {
        k: v.to(device) for k, v in batch.inputs.items() if k in _MODEL_KEYS and isinstance(v, Tensor)
    }
    if getattr(getattr(unwrap_model(model), "config", None), "use_cache", None) is not None:
        inputs["use_cache"] = False  # a KV cache is dead weight here
    reduction = "mean" if mode == "batch" else "sum"  # the mean is over the c_b label tokens
    if fused:
        targets = shift_labels(batch.labels).to(device)

        def nll(hidden: Tensor, head: nn.Linear) -> Tensor:
            backend = "torch" if hidden.dtype == torch.float64 else "auto"
            return fused_linear_nll_loss(
                hidden, head.weight, targets, bias=head.bias, reduction=reduction, backend=backend
            )

        return head_computes(model, targets, nll, lambda: model(**inputs)).logits
    output = model(**inputs)
    logits = output.logits if hasattr(output, "logits") else output[0]
    return shifted_nll(logits, batch.labels, reduction)


def _zeros(layer: nn.Linear) -> Tensor:
    # The shape from the module: under ZeRO-3 the weight itself is an empty shard.
    return torch.zeros(linear_shape(layer), dtype=torch.float32, device=layer.weight.device)


def run_pass(
    model: nn.Module,
    data: Data,
    layers: Mapping[str, nn.Linear],
    *,
    mode: str,
    backend: str,
    fold: bool = True,
    progress: bool = False,
    desc: str = "Fisher",
) -> dict[str, Tensor]:
    """One forward and one backward per batch of ``data``: each layer's ``Σ_n (G_nᵀ X_n)²`` summed over
    the batches (per the mode; fp32, shaped like the weight, zeros where no gradient reached), in the
    order of ``layers``; ``fold=False`` only runs the pass (to measure its activations). Call inside
    :func:`fisher_session`. Under ``torchrun`` rank ``r`` of ``W`` passes batches ``r, r+W, ...`` and the
    sums are all-reduced; under ZeRO-3, whose passes are collectives, a rank with one batch fewer runs
    one more pass that folds nothing."""
    from tqdm.auto import tqdm

    anchor = torch.zeros((), device=model_device(model), requires_grad=True)
    folder = _Folder(layers, mode, backend, anchor)
    fused = takes_fused_path(model)
    if fused:  # not when the output head is measured: its output gradient is the logits', never formed
        head = find_causal_lm(model).get_output_embeddings()
        heads = {id(m) for m in head.modules()} if isinstance(head, nn.Module) else set()
        fused = not any(id(layer) in heads for layer in layers.values())
    handles = [m.register_forward_hook(functools.partial(folder.hook, n)) for n, m in layers.items()]
    try:
        batches = distributed.shard(data.batches) if fold else data.batches
        folding = [fold] * len(batches)
        if fold and any(is_partitioned(p) for p in model.parameters()):
            missing = math.ceil(len(data.batches) / distributed.world_size()) - len(batches)
            batches, folding = batches + data.batches[:missing], folding + [False] * missing
        hidden = not (progress and distributed.is_main())
        steps = zip(batches, folding)
        for batch, folder.folding in tqdm(steps, total=len(batches), desc=desc, disable=hidden):
            folder.start_batch(batch)
            with torch.enable_grad():
                loss = _batch_loss(model, batch, mode, fused)
                folder.in_forward = False
                if loss.requires_grad:
                    loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    if not fold:
        return {}
    return {
        name: distributed.all_reduce_sum(folder.sums.pop(name) if name in folder.sums else _zeros(layer))
        for name, layer in layers.items()
    }


def _checkpoint_units(model: nn.Module, requested: bool | None) -> list[nn.Module]:
    """The blocks to checkpoint: ``transformers``' checkpointable layers, those it checkpoints itself
    when ``requested`` is ``None`` (follow the model), all of them when ``True``, none when ``False``."""
    # A model can only hold these layers if their module has been imported; older transformers have none
    # (they checkpoint in the model's loop, in training mode only).
    modeling_layers = sys.modules.get("transformers.modeling_layers")
    checkpointable = getattr(modeling_layers, "GradientCheckpointingLayer", None)
    units = [m for m in model.modules() if isinstance(m, checkpointable)] if checkpointable else []
    enabled = [m for m in units if getattr(m, "gradient_checkpointing", False)]
    if requested is None:
        return enabled
    if not requested:
        return []
    if not units:
        raise ValueError(
            f"gradient_checkpointing=True: {type(model).__name__} has no checkpointable layers "
            "(transformers' GradientCheckpointingLayer); pass gradient_checkpointing=False"
        )
    return enabled or units


def _checkpoint_forward(module: nn.Module) -> Callable[[], None]:
    """Make ``module``'s forward run under non-reentrant checkpointing; returns the undo."""
    previous = module.__dict__.get("forward")  # e.g. accelerate's dispatch hooks set an instance forward
    inner = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        from torch.utils.checkpoint import checkpoint

        return checkpoint(functools.partial(inner, **kwargs), *args, use_reentrant=False)

    module.forward = forward

    def undo() -> None:
        del module.forward  # the instance attribute set above
        if previous is not None:
            module.forward = previous

    return undo


def _detach_output(module: nn.Module, args: tuple, output: Any) -> Any:
    return output.detach() if isinstance(output, Tensor) and output.requires_grad else None


@contextmanager
def fisher_session(model: nn.Module, gradient_checkpointing: bool | None) -> Iterator[None]:
    """The model as passes need it, restored however the block exits: eval mode, every parameter frozen,
    the input embeddings' output detached and the blocks of :func:`_checkpoint_units` checkpointed."""
    with ExitStack() as restore:
        for m in model.modules():
            restore.callback(setattr, m, "training", m.training)
        for p in model.parameters():
            restore.callback(p.requires_grad_, p.requires_grad)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        get_embeddings = getattr(unwrap_model(model), "get_input_embeddings", None)
        try:
            embeddings = get_embeddings() if callable(get_embeddings) else None
        except NotImplementedError:
            embeddings = None
        if isinstance(embeddings, nn.Module):
            restore.callback(embeddings.register_forward_hook(_detach_output).remove)
        for unit in _checkpoint_units(model, gradient_checkpointing):
            restore.callback(_checkpoint_forward(unit))
        yield
