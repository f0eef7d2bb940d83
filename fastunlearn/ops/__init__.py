"""Fused operations on tensors: the losses and gradient statistics the rest of fastunlearn is built on.

- :mod:`~fastunlearn.ops.ihl`: the Inverted Hinge Loss (SPEC §2): :func:`~fastunlearn.ops.ihl.ihl_loss`,
  its module and autograd function; :mod:`~fastunlearn.ops._ihl_torch` is its
  chunked PyTorch (CPU) path.
- :mod:`~fastunlearn.ops.fused_linear`: IHL from the last hidden states without the logits.
- :mod:`~fastunlearn.ops.nll`: the shifted next-token NLL that training objectives, metrics and the
  Fisher estimate all use.
- :mod:`~fastunlearn.ops.grad_sq`: ``Σ_n (G_nᵀ X_n)²``, the per-example squared weight gradients of a
  linear layer that the Fisher estimate sums (SPEC §3.1).
- :mod:`~fastunlearn.ops._backend`: the ``backend=`` argument every operation shares.

Operations take tensors and return tensors. They import PyTorch, and the Triton kernels of
``fastunlearn.kernels`` only when a Triton backend runs; nothing here knows of models, training,
evaluation or the command line.
"""

# The label of a position that carries no loss (prompt, padding), as in PyTorch and Hugging Face.
IGNORE_INDEX = -100
