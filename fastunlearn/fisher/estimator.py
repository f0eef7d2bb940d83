"""Diagonal empirical Fisher information of a model's linear layers, without per-example gradients.

For an ``nn.Linear`` weight ``W ∈ R^{out×in}`` and example ``n`` with layer inputs ``X_n ∈ R^{T×in}``
(one row per token) and output gradients ``G_n ∈ R^{T×out}`` of that example's loss ``L_n``, the
chain rule through ``Y_n = X_n Wᵀ`` gives the example's weight gradient ``g_n = ∂L_n/∂W = G_nᵀ X_n``,
and the diagonal empirical Fisher (SPEC §3.1) is

    F = (1/N) Σ_n g_n ⊙ g_n.

Three observations make it cheap:

1. Examples in a batch do not interact, so the output gradients of the *summed* loss ``Σ_n L_n`` are,
   row block by row block, each example's own ``G_n``: one backward pass gives all of them.
2. The weight gradient itself is never needed. The weights are frozen, a forward hook keeps ``X``, a
   hook on the layer's output tensor receives ``G`` during the backward, and
   :func:`fastunlearn.ops.grad_sq.per_example_grad_sq` folds ``Σ_n (G_nᵀ X_n)²`` straight into ``F``.
3. That fold is a GEMM over ``B·T`` whose accumulator is squared after each example's ``T`` tokens;
   the Triton kernel (``fastunlearn.kernels.grad_sq``) does it in registers, never building the
   ``[B, out, in]`` per-example gradients that BackPACK, Opacus and ``torch.func`` build.

The square is outside the token sum and inside the example sum: attention mixes tokens, so the
"token-level" quantity ``Σ_{n,t} (G_n[t] ⊗ X_n[t])²`` (one matrix product, ``(G⊙G)ᵀ(X⊙X)``) is a
different estimator; it is offered only as ``mode="token"``.

``mode="batch"`` is the estimator of the paper's code: with ``L̄_b`` the token-mean NLL of batch ``b``
and ``c_b`` its number of label tokens, ``F = Σ_b c_b·(∇L̄_b)² / Σ_b c_b``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fastunlearn.fisher.estimate import FISHER_MODES, FisherEstimate, FisherMode, _check_finite
from fastunlearn.fisher.layers import select_linear_layers
from fastunlearn.modeling import model_device, unwrap_model
from fastunlearn.ops import IGNORE_INDEX
from fastunlearn.ops._backend import Backend, resolve_backend
from fastunlearn.ops.grad_sq import per_example_grad_sq
from fastunlearn.ops.nll import shift_labels, shifted_nll

__all__ = ["estimate_fisher"]


_MODEL_KEYS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")


def _check_batch(batch: Any, index: int) -> tuple[Tensor, Tensor]:
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"batch {index} must be a mapping with input_ids and labels, got {type(batch).__name__}"
        )
    for key in ("input_ids", "labels"):
        if key not in batch or not isinstance(batch[key], Tensor):
            raise ValueError(
                f"batch {index} has no {key!r} tensor (keys: {sorted(batch)}); Fisher estimation needs "
                "input_ids and labels (-100 at positions without a loss)"
            )
    input_ids, labels = batch["input_ids"], batch["labels"]
    if input_ids.dim() != 2 or labels.shape != input_ids.shape:
        raise ValueError(
            f"batch {index}: input_ids and labels must both be [batch, tokens]; got {tuple(input_ids.shape)} "
            f"and {tuple(labels.shape)}"
        )
    if labels.is_floating_point():
        raise TypeError(f"batch {index}: labels must be integer token ids, got {labels.dtype}")
    return input_ids, labels


class _Collector:
    """Forward/tensor hooks that fold each target layer's ``Σ_n (G_nᵀ X_n)²`` into an accumulator."""

    def __init__(self, layers: Mapping[str, nn.Linear], mode: str, backend: str) -> None:
        self.layers = layers
        self.mode = mode
        self.backend = backend
        # Created on a layer's first output gradient, as autograd creates `.grad`: allocating all of
        # them before the forward would add the whole estimate to the forward's activation peak.
        self.sums: dict[str, Tensor] = {}
        self.batch_size = 0
        self.batch_weight: Tensor | None = None
        self.calls: dict[str, int] = {}
        self.leaves: dict[int, tuple[Tensor, Tensor]] = {}

    def start_batch(self, batch_size: int, batch_weight: Tensor) -> None:
        self.batch_size = batch_size
        self.batch_weight = batch_weight
        self.calls = dict.fromkeys(self.layers, 0)
        self.leaves.clear()

    def pre_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            if not args or not isinstance(args[0], Tensor):
                raise ValueError(f"layer {name!r} was called without a positional input tensor")
            x = args[0]
            if x.requires_grad or not torch.is_grad_enabled():
                return None
            # Frozen weights and an input that needs no gradient (the first layers) would leave the
            # output outside the graph: substitute a leaf that requires grad, one per input tensor so
            # q/k/v of a block share it. The original is kept alive so its id stays unique.
            if id(x) not in self.leaves:
                self.leaves[id(x)] = (x, x.detach().requires_grad_(True))
            return (self.leaves[id(x)][1], *args[1:])

        return hook

    def forward_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            self.calls[name] += 1
            if self.calls[name] > 1:
                raise ValueError(
                    f"layer {name!r} ran more than once in one forward pass (shared weights or activation "
                    "checkpointing); its per-example gradient is a sum over calls, which is not supported"
                )
            if not output.requires_grad:
                return
            x = args[0].detach()
            if x.dim() < 2 or x.shape[0] != self.batch_size:
                raise ValueError(
                    f"layer {name!r} received inputs of shape {tuple(x.shape)}; per-example Fisher needs "
                    f"the batch ({self.batch_size} examples) as the leading dimension"
                )
            output.register_hook(self._backward_hook(name, x))

        return hook

    def _backward_hook(self, name: str, x: Tensor) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            B = x.shape[0]
            inputs = x.reshape(B, -1, x.shape[-1])
            grads = grad.detach().reshape(B, -1, grad.shape[-1])
            if self.mode == "batch":  # one "example": the whole batch, its gradient weighted by sqrt(c_b)
                inputs = inputs.reshape(1, -1, inputs.shape[-1])
                grads = grads.reshape(1, -1, grads.shape[-1])
                grads = grads.to(torch.promote_types(grads.dtype, torch.float32)) * self.batch_weight
            elif self.mode == "token":  # every token its own "example"
                inputs, grads = inputs.reshape(-1, inputs.shape[-1]), grads.reshape(-1, grads.shape[-1])
            if name not in self.sums:
                self.sums[name] = self.zeros(name)
            per_example_grad_sq(inputs, grads, self.sums[name], backend=self.backend)

        return hook

    def zeros(self, name: str) -> Tensor:
        weight = self.layers[name].weight
        return torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)

    def result(self, scale: float) -> dict[str, Tensor]:
        """``scale·Σ`` per layer, in the order of ``layers``; zeros for a layer no gradient reached."""
        return {
            name: self.sums[name].mul_(scale) if name in self.sums else self.zeros(name)
            for name in self.layers
        }


class _ModelState:
    """Remembers what estimation changes on a model (requires_grad, train/eval) and restores it."""

    def __init__(self, model: nn.Module) -> None:
        self.requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        self.training = [(m, m.training) for m in model.modules()]

    def restore(self) -> None:
        for p, flag in self.requires_grad:
            p.requires_grad_(flag)
        for m, flag in self.training:
            m.training = flag


def _batch_loss(
    model: nn.Module, batch: Mapping[str, Any], labels: Tensor, tokens: Tensor, mode: str
) -> Tensor:
    """The loss whose backward yields the wanted ``G``.

    ``per_example``/``token``: ``Σ_n L_n`` with ``L_n`` example n's summed token NLL.
    ``batch``: the token mean ``L̄_b = Σ_n L_n / c_b``, as the paper's code differentiates it; the hook
    scales its output gradients by ``sqrt(c_b)`` so that the square is the paper's ``c_b·(∇L̄_b)²``
    (differentiating the same loss the same way keeps the estimate equal to the paper's to fp32
    rounding, element by element).

    The NLL is :func:`fastunlearn.ops.nll.shifted_nll` (the logit at t predicts token t+1; fp32 at
    least, fp64 kept for fp64 models).
    """
    device = model_device(model)
    inputs: dict[str, Any] = {
        k: v.to(device) for k, v in batch.items() if k in _MODEL_KEYS and isinstance(v, Tensor)
    }
    if getattr(getattr(unwrap_model(model), "config", None), "use_cache", None) is not None:
        inputs["use_cache"] = False  # a KV cache is dead weight here
    output = model(**inputs)
    logits = output.logits if hasattr(output, "logits") else output[0]
    nll = shifted_nll(logits, labels, "sum")
    if mode == "batch":
        nll = nll / tokens.to(nll.device).clamp_min(1)
    return nll


def estimate_fisher(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    target_modules: str | Sequence[str] | None = None,
    mode: FisherMode = "per_example",
    backend: Backend = "auto",
    progress: bool = True,
) -> FisherEstimate:
    """Diagonal empirical Fisher of a causal LM's linear layers over ``batches`` (SPEC §3.1).

    Args:
        model: a ``transformers`` causal LM (anything returning ``.logits`` from ``input_ids``), plain
            or ``peft``-wrapped; for adapter layers the frozen base weight is measured.
        batches: iterable of dicts with ``input_ids`` and ``labels`` (``[B, T]``, ``-100`` = no loss,
            aligned with the inputs as in Hugging Face: the model's logit at ``t`` predicts ``t+1``) and
            optionally ``attention_mask``, ``position_ids``.
        target_modules: canonical names or dotted suffixes (``["q_proj", "v_proj"]``); ``None`` = every
            ``nn.Linear`` but the output embedding.
        mode: ``"per_example"`` — ``F = (1/N) Σ_n g_n²``, ``g_n`` the gradient of example ``n``'s
            summed token NLL, ``N`` the examples with at least one label; ``"batch"`` — the paper's
            ``Σ_b c_b (∇L̄_b)² / Σ_b c_b``; ``"token"`` — ``(1/N) Σ_{n,t} (G_n[t] ⊗ X_n[t])²``, the
            cheaper token-level quantity (a different estimator).
        backend: for :func:`per_example_grad_sq`.
        progress: show a ``tqdm`` progress bar.

    One forward and one backward per batch, in eval mode (no dropout). The weights are frozen for the
    duration and no ``.grad`` is created; requires_grad flags, train/eval modes and hooks are restored
    however the function exits.

    Raises:
        ValueError: an unknown mode or target, a batch without ``input_ids``/``labels``, no label token
            in any batch, non-finite values in the result.
    """
    if mode not in FISHER_MODES:
        raise ValueError(f"unknown Fisher mode {mode!r}; expected one of {FISHER_MODES}")
    layers = select_linear_layers(model, target_modules)
    for device in {layer.weight.device for layer in layers.values()}:
        resolve_backend(backend, device)  # an unusable backend fails now, not inside the backward
    for name, layer in layers.items():
        if not layer.weight.is_floating_point():
            raise TypeError(
                f"layer {name!r} stores {layer.weight.dtype} weights (quantised?); cannot measure it"
            )
    from tqdm.auto import tqdm

    collector = _Collector(layers, mode, backend)
    state = _ModelState(model)
    handles = []
    total_tokens: Tensor | int = 0
    total_examples: Tensor | int = 0
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for name, layer in layers.items():
            handles.append(layer.register_forward_pre_hook(collector.pre_hook(name)))
            handles.append(layer.register_forward_hook(collector.forward_hook(name)))
        total = len(batches) if hasattr(batches, "__len__") else None
        seen = 0
        for index, batch in enumerate(
            tqdm(batches, total=total, desc=f"Fisher ({mode})", disable=not progress)
        ):
            input_ids, labels = _check_batch(batch, index)
            valid = shift_labels(labels) != IGNORE_INDEX  # the logit at t predicts t+1
            tokens, examples = valid.sum(), valid.any(dim=1).sum()
            collector.start_batch(input_ids.shape[0], tokens.clamp_min(1).double().sqrt())
            with torch.enable_grad():
                loss = _batch_loss(model, batch, labels, tokens, mode)
                if loss.requires_grad:
                    loss.backward()
            collector.leaves.clear()
            total_tokens = total_tokens + tokens
            total_examples = total_examples + examples
            seen += 1
    finally:
        for handle in handles:
            handle.remove()
        state.restore()
    if seen == 0:
        raise ValueError("estimate_fisher got no batches")
    num_tokens, num_examples = int(total_tokens), int(total_examples)
    if num_tokens == 0:
        raise ValueError("every label in the batches is -100: there is no token to measure the Fisher on")
    scale = 1.0 / (num_tokens if mode == "batch" else num_examples)
    fisher = collector.result(scale)
    _check_finite(fisher, "the Fisher estimate")
    return FisherEstimate(fisher, num_examples=num_examples, num_tokens=num_tokens, mode=mode)
