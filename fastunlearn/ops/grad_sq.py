"""``Σ_n (G_nᵀ X_n)²``: the summed squared per-example weight gradients of a linear layer, the sum inside
the diagonal empirical Fisher that FILA weights its initialisation by (Cha et al. 2025).

For an ``nn.Linear`` and example ``n`` with inputs ``X_n ∈ R^{T×in}`` and output gradients
``G_n ∈ R^{T×out}``, the example's weight gradient is ``g_n = G_nᵀ X_n``. The Triton kernel
(``fastunlearn.kernels.grad_sq``) squares and folds each ``g_n`` in registers, never building the
``[B, out, in]`` per-example gradients of BackPACK, Opacus or ``torch.func``; the PyTorch path builds
them in bounded chunks, which the custom operator reports as its workspace.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastunlearn.ops._backend import Backend, Layout, Workspace, compute_dtype, resolve_backend

# Bytes of per-example gradients the PyTorch path holds at once ([chunk, out, in]): small, since on CPU
# the chunk size does not change the speed; at 7B shapes it is one example.
TORCH_BUFFER_BYTES = 8 * 2**20


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


def _one_token(inputs: Tensor) -> bool:
    return inputs.dim() == 2 or inputs.shape[1] == 1


def _layout(
    inputs: Tensor, grad_outputs: Tensor, backend: str, buffer_bytes: int = TORCH_BUFFER_BYTES
) -> Layout:
    """The operator's workspace. With one token per example: the squared operands and their product. On
    the PyTorch path: ``[chunk, out, in]`` per-example gradients (at most ``buffer_bytes``), their
    ``[out, in]`` sum, and copies of a chunk's operands where their dtype is not the computation's."""
    dtype = compute_dtype(inputs, grad_outputs)
    n_in, n_out = inputs.shape[-1], grad_outputs.shape[-1]
    if _one_token(inputs):
        n = inputs.shape[:-1].numel()
        return {"x_sq": ((n, n_in), dtype), "g_sq": ((n, n_out), dtype), "product": ((n_out, n_in), dtype)}
    if backend != "torch":
        return {}
    B, T = inputs.shape[:2]
    chunk = max(1, min(B, buffer_bytes // max(n_out * n_in * dtype.itemsize, 1)))
    layout = {"grads": ((chunk, n_out, n_in), dtype), "total": ((n_out, n_in), dtype)}
    if inputs.dtype != dtype:
        layout["x"] = ((chunk, T, n_in), dtype)
    if grad_outputs.dtype != dtype:
        layout["g"] = ((chunk, T, n_out), dtype)
    return layout


def _token_products(inputs: Tensor, grad_outputs: Tensor, out: Tensor) -> Tensor:
    """``out += (G⊙G)ᵀ(X⊙X)``: with one token per example ``g_n`` is an outer product, so
    ``Σ_n (g_n)²_{oi} = Σ_n G_n[o]²·X_n[i]²`` is one matrix product. Returns the workspace's handle."""
    workspace = Workspace(_layout(inputs, grad_outputs, "torch"), out.device)
    x_sq, g_sq = workspace["x_sq"], workspace["g_sq"]
    x_sq.copy_(inputs.reshape(x_sq.shape)).square_()
    g_sq.copy_(grad_outputs.reshape(g_sq.shape)).square_()
    out.add_(torch.mm(g_sq.t(), x_sq, out=workspace["product"]))
    return workspace.handle()


def _grad_sq_torch(inputs: Tensor, grad_outputs: Tensor, out: Tensor, buffer_bytes: int) -> Tensor:
    """Batched products over chunks of examples holding at most ``buffer_bytes`` of ``g_n``, in one
    workspace written through ``out=`` (fresh buffers per chunk would fragment the allocator). Returns
    the workspace's handle."""
    workspace = Workspace(_layout(inputs, grad_outputs, "torch", buffer_bytes), out.device)
    buffer, total = workspace["grads"], workspace["total"]
    for start in range(0, inputs.shape[0], buffer.shape[0]):
        x, g = inputs[start : start + buffer.shape[0]], grad_outputs[start : start + buffer.shape[0]]
        n = x.shape[0]
        x = x if workspace["x"] is None else workspace["x"][:n].copy_(x)
        g = g if workspace["g"] is None else workspace["g"][:n].copy_(g)
        grads = torch.bmm(g.transpose(1, 2), x, out=buffer[:n])  # g_n = G_nᵀ X_n
        out.add_(torch.sum(grads.square_(), dim=0, out=total))
    return workspace.handle()


@torch.library.custom_op("fastunlearn::per_example_grad_sq", mutates_args=("out",))
def _grad_sq_op(inputs: Tensor, grad_outputs: Tensor, out: Tensor, backend: str, accumulate: bool) -> Tensor:
    """Adds ``Σ_n (G_nᵀ X_n)²`` into ``out`` (Triton without ``accumulate``: writes it); returns its
    workspace's handle (:mod:`fastunlearn.ops._backend`), empty for the Triton kernel."""
    if _one_token(inputs):
        return _token_products(inputs, grad_outputs, out)
    if backend == "torch":
        return _grad_sq_torch(inputs, grad_outputs, out, TORCH_BUFFER_BYTES)
    from fastunlearn.kernels.grad_sq import grad_sq  # imports triton: only when asked for

    grad_sq(inputs, grad_outputs, out, accumulate=accumulate)
    return Workspace({}, out.device).handle()


@_grad_sq_op.register_fake
def _(inputs, grad_outputs, out, backend, accumulate):
    return Workspace(_layout(inputs, grad_outputs, backend), out.device).handle()


def per_example_grad_sq(
    inputs: Tensor, grad_outputs: Tensor, out: Tensor | None = None, *, backend: Backend = "auto"
) -> Tensor:
    """``Σ_n g_n ⊙ g_n`` with ``g_n = G_nᵀ X_n`` the weight gradient of example ``n``'s loss: an fp32
    ``[out, in]`` tensor, the token sum completed before squaring.

    ``inputs``: ``[B, T, in]`` (or ``[B, in]``) layer inputs, ``grad_outputs``: ``[B, T, out]`` (or
    ``[B, out]``) output gradients, any float dtypes and strides. ``out``: an fp32 ``[out, in]`` tensor
    to add into (returned). The PyTorch path holds at most ``TORCH_BUFFER_BYTES`` of per-example
    gradients and accumulates fp64 operands in fp64.
    """
    _check_grad_sq_inputs(inputs, grad_outputs, out)
    resolved = resolve_backend(backend, inputs.device)
    accumulate = out is not None
    if out is None:
        out = torch.zeros(grad_outputs.shape[-1], inputs.shape[-1], dtype=torch.float32, device=inputs.device)
    if inputs.numel() == 0 or grad_outputs.numel() == 0:
        return out
    if resolved == "triton" and not _one_token(inputs):
        dtype = torch.promote_types(inputs.dtype, grad_outputs.dtype)
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            dtype = torch.float32  # tl.dot has no fp64 tensor-core path worth having here
        inputs, grad_outputs = inputs.to(dtype), grad_outputs.to(dtype)
    _grad_sq_op(inputs, grad_outputs, out, resolved, accumulate)  # its workspace is dropped at once
    return out
