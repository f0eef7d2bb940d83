"""Fused tensor operations: the losses and gradient statistics the rest of fastunlearn is built on, each
a PyTorch custom operator (``torch.ops.fastunlearn.*``) with a fake implementation, so ``torch.compile``
traces it as one node and ``FakeTensorMode`` runs it on shapes alone. The Triton kernels of
``fastunlearn.kernels`` are imported only when a Triton backend runs."""

# The label of a position that carries no loss (prompt, padding), as in PyTorch and Hugging Face.
IGNORE_INDEX = -100
