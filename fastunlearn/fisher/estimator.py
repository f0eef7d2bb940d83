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
   :func:`per_example_grad_sq` folds ``Σ_n (G_nᵀ X_n)²`` straight into ``F``.
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

import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastunlearn._backend import Backend, resolve_backend
from fastunlearn._io import atomic_file

Mode = Literal["per_example", "batch", "token"]
MODES: tuple[str, ...] = ("per_example", "batch", "token")
IGNORE_INDEX = -100
FORMAT = "fastunlearn.fisher"
FORMAT_VERSION = "1"

# Bytes of per-example gradients the chunked PyTorch path may hold at once ([chunk, out, in]). Small on
# purpose: on CPU the chunk size does not change the speed (measured, single thread: 688×256 and
# 1376×512 layers, chunks of 1 to 8 examples within noise), so the buffer stays far below the
# [B, out, in] that per-sample-gradient libraries allocate; at 7B shapes it is one example.
TORCH_BUFFER_BYTES = 8 * 2**20

__all__ = [
    "FisherEstimate",
    "canonical_name",
    "estimate_fisher",
    "linear_layers",
    "per_example_grad_sq",
    "per_example_grad_sq_reference",
    "select_linear_layers",
    "unwrap_model",
]


# --------------------------------------------------------------------------------------------------
# Σ_n (G_nᵀ X_n)²
# --------------------------------------------------------------------------------------------------


def _check_grad_sq_inputs(inputs: Tensor, grad_outputs: Tensor, out: Tensor | None) -> None:
    if not isinstance(inputs, Tensor) or not isinstance(grad_outputs, Tensor):
        raise TypeError("per_example_grad_sq expects tensors for `inputs` and `grad_outputs`")
    for name, t in (("inputs", inputs), ("grad_outputs", grad_outputs)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if inputs.dim() not in (2, 3) or grad_outputs.dim() != inputs.dim():
        raise ValueError(
            "inputs and grad_outputs must both be [B, T, features] or both [B, features]; got "
            f"{tuple(inputs.shape)} and {tuple(grad_outputs.shape)}"
        )
    if inputs.shape[:-1] != grad_outputs.shape[:-1]:
        raise ValueError(
            f"inputs {tuple(inputs.shape)} and grad_outputs {tuple(grad_outputs.shape)} must agree in every "
            "dimension but the last (examples and tokens)"
        )
    if inputs.device != grad_outputs.device:
        raise ValueError(f"inputs are on {inputs.device} but grad_outputs are on {grad_outputs.device}")
    if out is not None:
        if not isinstance(out, Tensor):
            raise TypeError(f"out must be a tensor or None, got {type(out).__name__}")
        expected = (grad_outputs.shape[-1], inputs.shape[-1])
        if tuple(out.shape) != expected:
            raise ValueError(f"out must have shape [out, in] = {expected}, got {tuple(out.shape)}")
        if out.dtype != torch.float32:
            raise TypeError(f"out must be float32, got {out.dtype}")
        if out.device != inputs.device:
            raise ValueError(f"out is on {out.device} but the inputs are on {inputs.device}")


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """fp64 when any operand is fp64 (the oracles), fp32 otherwise: the result is fp32 either way."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _token_products(inputs: Tensor, grad_outputs: Tensor, out: Tensor) -> None:
    """``out += (G⊙G)ᵀ(X⊙X)`` over all rows: with one token per example, ``g_n`` is an outer product and
    ``(g_n)²_{oi} = G_n[o]²·X_n[i]²``, so the sum over examples is one matrix product."""
    dtype = _compute_dtype(inputs, grad_outputs)
    x = inputs.reshape(-1, inputs.shape[-1]).to(dtype)
    g = grad_outputs.reshape(-1, grad_outputs.shape[-1]).to(dtype)
    out.add_(torch.mm(g.square().t(), x.square()))


def _grad_sq_torch(inputs: Tensor, grad_outputs: Tensor, out: Tensor, buffer_bytes: int) -> None:
    """Batched products over chunks of examples, holding at most ``buffer_bytes`` of ``g_n``."""
    dtype = _compute_dtype(inputs, grad_outputs)
    B = inputs.shape[0]
    per_example = grad_outputs.shape[-1] * inputs.shape[-1] * torch.finfo(dtype).bits // 8
    chunk = max(1, min(B, buffer_bytes // max(per_example, 1)))
    # Both buffers are allocated once and written through `out=`: a fresh [chunk, out, in] per chunk
    # would let the allocator fragment and grow the process well past the bound.
    buffer = torch.empty(chunk, out.shape[0], out.shape[1], dtype=dtype, device=out.device)
    total = torch.empty(out.shape, dtype=dtype, device=out.device)
    for start in range(0, B, chunk):
        x = inputs[start : start + chunk].to(dtype)
        g = grad_outputs[start : start + chunk].to(dtype)
        grads = buffer[: x.shape[0]]
        torch.bmm(g.transpose(1, 2), x, out=grads)  # g_n = G_nᵀ X_n
        torch.sum(grads.square_(), dim=0, out=total)
        out.add_(total)


def per_example_grad_sq_reference(inputs: Tensor, grad_outputs: Tensor, out: Tensor | None = None) -> Tensor:
    """``Σ_n (G_nᵀ X_n)²`` by materialising every ``g_n`` at once (``einsum`` into ``[B, out, in]``).

    What per-sample-gradient libraries do for sequence inputs; the benchmark's baseline and, in fp64,
    the tests' oracle. Computes in fp32 (fp64 for fp64 operands) and returns/adds into fp32.
    """
    _check_grad_sq_inputs(inputs, grad_outputs, out)
    if out is None:
        out = torch.zeros(grad_outputs.shape[-1], inputs.shape[-1], dtype=torch.float32, device=inputs.device)
    dtype = _compute_dtype(inputs, grad_outputs)
    x, g = inputs.to(dtype), grad_outputs.to(dtype)
    if x.dim() == 2:
        x, g = x.unsqueeze(1), g.unsqueeze(1)
    out.add_(torch.einsum("bto,bti->boi", g, x).square().sum(dim=0))
    return out


# A graph break under torch.compile: Dynamo must not trace into the Triton launcher.
@torch._disable_dynamo
def per_example_grad_sq(
    inputs: Tensor, grad_outputs: Tensor, out: Tensor | None = None, *, backend: Backend = "auto"
) -> Tensor:
    """Sum over examples of the squared per-example weight gradient of a linear layer (SPEC §3.1).

    With ``X_n = inputs[n]`` (``[T, in]``) and ``G_n = grad_outputs[n]`` (``[T, out]``), the weight
    gradient of example ``n``'s loss is ``g_n = G_nᵀ X_n`` and this returns ``Σ_n g_n ⊙ g_n``, an fp32
    ``[out, in]`` tensor. The token sum is completed before squaring; ``[B, out, in]`` is never built
    by the Triton path and is built in bounded chunks by the PyTorch path.

    Args:
        inputs: ``[B, T, in]`` layer inputs, or ``[B, in]`` (one token per example, in which case the
            result is the single product ``(G⊙G)ᵀ(X⊙X)``). Any float dtype and strides.
        grad_outputs: ``[B, T, out]`` (or ``[B, out]``) gradients of the loss with respect to the
            layer's outputs. Operands of different dtypes are promoted to a common one.
        out: optional fp32 ``[out, in]`` tensor (any strides) to add the result into.
        backend: ``"auto"`` (Triton for CUDA tensors, PyTorch otherwise), ``"triton"`` (also CPU
            tensors under ``TRITON_INTERPRET=1``), ``"torch"`` (batched products over example chunks
            holding at most ``TORCH_BUFFER_BYTES`` of gradients) or ``"reference"`` (full ``einsum``
            materialisation, :func:`per_example_grad_sq_reference`).

    Returns:
        ``out`` (after adding into it) or a new fp32 tensor. Accumulation is fp32 in every backend,
        fp64 on the PyTorch paths for fp64 operands.
    """
    _check_grad_sq_inputs(inputs, grad_outputs, out)
    resolved = resolve_backend(backend, inputs.device)
    if resolved == "reference":
        return per_example_grad_sq_reference(inputs, grad_outputs, out)
    accumulate = out is not None
    if out is None:
        out = torch.zeros(grad_outputs.shape[-1], inputs.shape[-1], dtype=torch.float32, device=inputs.device)
    if inputs.numel() == 0 or grad_outputs.numel() == 0:
        return out
    if inputs.dim() == 2 or inputs.shape[1] == 1:
        _token_products(inputs, grad_outputs, out)
    elif resolved == "torch":
        _grad_sq_torch(inputs, grad_outputs, out, TORCH_BUFFER_BYTES)
    else:
        from fastunlearn.kernels.grad_sq import grad_sq  # imports triton: only when asked for

        dtype = torch.promote_types(inputs.dtype, grad_outputs.dtype)
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            dtype = torch.float32  # tl.dot has no fp64 tensor-core path worth having here
        grad_sq(inputs.to(dtype), grad_outputs.to(dtype), out, accumulate=accumulate)
    return out


# --------------------------------------------------------------------------------------------------
# Module discovery and names
# --------------------------------------------------------------------------------------------------


def canonical_name(name: str) -> str:
    """The name of a linear layer in the plain (un-wrapped) model.

    Strips what wrappers add, so that estimates taken on a ``transformers`` model and on the same model
    wrapped by ``peft`` (or DDP/DeepSpeed) share their keys:
    ``module.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight`` →
    ``model.layers.0.self_attn.q_proj``.
    """
    for prefix in ("module.", "base_model.model."):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    for suffix in (".weight", ".base_layer"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def _tuner_layer_class() -> type | None:
    # A model can only contain peft layers if peft has been imported: no need to import it otherwise.
    if "peft" not in sys.modules:
        return None
    from peft.tuners.tuners_utils import BaseTunerLayer

    return BaseTunerLayer


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model under a ``peft`` wrapper (with its adapter layers in place), or ``model`` itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of ``model`` by canonical name; for a ``peft`` adapter layer, its frozen base.

    The adapters' own linear layers (``lora_A``, ``lora_B``...) are not included.
    """
    root = unwrap_model(model)
    tuner = _tuner_layer_class()
    found: dict[str, nn.Linear] = {}
    skip = None  # named_modules is pre-order: a tuner layer's submodules follow it directly
    for name, module in root.named_modules():
        if skip is not None and name.startswith(skip):
            continue
        skip = None
        if tuner is not None and isinstance(module, tuner):
            skip = name + "."
            base = module.get_base_layer()
            if isinstance(base, nn.Linear):
                found[canonical_name(name)] = base
        elif isinstance(module, nn.Linear):
            found[canonical_name(name)] = module
    return found


def _output_embedding(model: nn.Module) -> nn.Module | None:
    root = unwrap_model(model)
    get_out = getattr(root, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    tuner = _tuner_layer_class()
    if head is not None and tuner is not None and isinstance(head, tuner):
        head = head.get_base_layer()
    return head


def _describe(names: Iterable[str], limit: int = 12) -> str:
    names = sorted(names)
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
    return f"layer types {suffixes}; layers: {shown}"


def select_linear_layers(
    model: nn.Module, target_modules: str | Sequence[str] | None
) -> dict[str, nn.Linear]:
    """Resolve ``target_modules`` (full canonical names or dotted suffixes) to linear layers.

    ``None`` selects every ``nn.Linear`` but the output embedding (``get_output_embeddings()``), the
    reference's scope. Raises ``ValueError`` naming any entry that matches nothing, with the candidates.
    """
    layers = linear_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layers to measure")
    if target_modules is None:
        head = _output_embedding(model)
        selected = {name: layer for name, layer in layers.items() if layer is not head}
        if not selected:
            raise ValueError("the model's only linear layer is its output embedding; name it explicitly")
        return selected
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    selected = {}
    for spec in target_modules:
        if not isinstance(spec, str) or not spec:
            raise TypeError(f"target_modules entries must be non-empty strings, got {spec!r}")
        key = canonical_name(spec)
        matched = {n: m for n, m in layers.items() if n == key or n.endswith("." + key)}
        if not matched:
            raise ValueError(
                f"target module {spec!r} matches no linear layer of the model; {_describe(layers)}"
            )
        selected.update(matched)
    return selected


# --------------------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------------------


def _check_finite(tensors: Mapping[str, Tensor], what: str) -> None:
    bad = [name for name, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"{what} has non-finite values (inf or nan) in {len(bad)} layer(s): {bad[:8]}")


class FisherEstimate(Mapping[str, Tensor]):
    """Diagonal Fisher estimates of linear layers: canonical layer name → fp32 tensor shaped like ``W``.

    Attributes:
        num_examples: sequences that carried at least one label token (the ``N`` of the mean).
        num_tokens: label tokens seen (``Σ_b c_b``, the normaliser of ``mode="batch"``).
        mode: the estimator, ``"per_example"``, ``"batch"`` or ``"token"``.

    Keys are canonical names (:func:`canonical_name`); lookups accept peft-style names too.
    """

    def __init__(
        self, tensors: Mapping[str, Tensor], *, num_examples: int, num_tokens: int, mode: str
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown Fisher mode {mode!r}; expected one of {MODES}")
        self._tensors: dict[str, Tensor] = {}
        for name, tensor in tensors.items():
            if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
                raise TypeError(f"Fisher entry {name!r} must be a floating-point tensor")
            key = canonical_name(name)
            if key in self._tensors:
                raise ValueError(f"Fisher entries {name!r} and another both map to layer {key!r}")
            self._tensors[key] = tensor.float()
        self.num_examples = int(num_examples)
        self.num_tokens = int(num_tokens)
        self.mode = mode

    def __getitem__(self, name: str) -> Tensor:
        return self._tensors[canonical_name(name)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and canonical_name(name) in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        return (
            f"FisherEstimate({len(self)} layers, mode={self.mode!r}, num_examples={self.num_examples}, "
            f"num_tokens={self.num_tokens})"
        )

    def to(self, device: torch.device | str) -> FisherEstimate:
        return FisherEstimate(
            {n: t.to(device) for n, t in self._tensors.items()},
            num_examples=self.num_examples,
            num_tokens=self.num_tokens,
            mode=self.mode,
        )

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write a safetensors file (tensors plus ``format``/``mode``/counts metadata), atomically."""
        from safetensors.torch import save_file

        metadata = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "mode": self.mode,
            "num_examples": str(self.num_examples),
            "num_tokens": str(self.num_tokens),
        }
        tensors = {n: t.detach().to("cpu").contiguous() for n, t in self._tensors.items()}
        atomic_file(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: torch.device | str = "cpu") -> FisherEstimate:
        """Read a file written by :meth:`save`; ``ValueError`` if it is not one."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no Fisher estimate at {path}")
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise ValueError(f"{path} is not a fastunlearn Fisher estimate (metadata {metadata})")
            if metadata.get("format_version") != FORMAT_VERSION:
                raise ValueError(
                    f"{path}: unsupported Fisher format version {metadata.get('format_version')!r}"
                )
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        try:
            counts = int(metadata["num_examples"]), int(metadata["num_tokens"])
        except (KeyError, ValueError) as err:
            raise ValueError(f"{path}: malformed Fisher metadata {metadata}") from err
        return cls(tensors, num_examples=counts[0], num_tokens=counts[1], mode=metadata.get("mode", ""))


# --------------------------------------------------------------------------------------------------
# estimate_fisher
# --------------------------------------------------------------------------------------------------

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
    model: nn.Module, batch: Mapping[str, Any], targets: Tensor, tokens: Tensor, mode: str
) -> Tensor:
    """The loss whose backward yields the wanted ``G``.

    ``per_example``/``token``: ``Σ_n L_n`` with ``L_n`` example n's summed token NLL.
    ``batch``: the token mean ``L̄_b = Σ_n L_n / c_b``, as the paper's code differentiates it; the hook
    scales its output gradients by ``sqrt(c_b)`` so that the square is the paper's ``c_b·(∇L̄_b)²``
    (differentiating the same loss the same way keeps the estimate equal to the paper's to fp32
    rounding, element by element).

    ``targets`` are the labels shifted left by one (the logit at t predicts token t+1) and padded with
    the ignored label, so the ``[B, T, V]`` logits flatten as a view rather than being sliced.
    """
    device = next(model.parameters()).device
    inputs: dict[str, Any] = {
        k: v.to(device) for k, v in batch.items() if k in _MODEL_KEYS and isinstance(v, Tensor)
    }
    if getattr(getattr(unwrap_model(model), "config", None), "use_cache", None) is not None:
        inputs["use_cache"] = False  # a KV cache is dead weight here
    output = model(**inputs)
    logits = output.logits if hasattr(output, "logits") else output[0]
    logits = logits.flatten(0, 1)
    # fp32 at least (bf16 logits lose the NLL's digits), fp64 kept for fp64 models.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    targets = targets.to(logits.device).flatten()
    nll = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    if mode == "batch":
        nll = nll / tokens.to(nll.device).clamp_min(1)
    return nll


def estimate_fisher(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    target_modules: str | Sequence[str] | None = None,
    mode: Mode = "per_example",
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
    if mode not in MODES:
        raise ValueError(f"unknown Fisher mode {mode!r}; expected one of {MODES}")
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
            targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # the logit at t predicts t+1
            valid = targets != IGNORE_INDEX
            tokens, examples = valid.sum(), valid.any(dim=1).sum()
            collector.start_batch(input_ids.shape[0], tokens.clamp_min(1).double().sqrt())
            with torch.enable_grad():
                loss = _batch_loss(model, batch, targets, tokens, mode)
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
