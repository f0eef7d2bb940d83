"""Fused operations on tensors: the losses and gradient statistics the rest of fastunlearn is built on.

- :mod:`~fastunlearn.ops.ihl`: the Inverted Hinge Loss (Cha et al. 2025, arXiv 2408.06621),
  :func:`~fastunlearn.ops.ihl.ihl_loss`, and the token NLL on the same kernels,
  :func:`~fastunlearn.ops.ihl.nll_loss`; :mod:`~fastunlearn.ops._ihl_torch` is their chunked PyTorch
  (CPU) path and :mod:`~fastunlearn.ops._row_ops` their custom operators.
- :mod:`~fastunlearn.ops.fused_linear`: IHL and NLL from the last hidden states without the logits
  (:func:`fused_linear_ihl_loss`, :func:`fused_linear_nll_loss`, :func:`fused_linear_token_stats`);
  the chunk machinery they share with the fused KL is :mod:`~fastunlearn.ops._linear_chunks`, their
  operators :mod:`~fastunlearn.ops._fused_ops`.
- :mod:`~fastunlearn.ops.kl`: ``KL(P_ref ‖ P_θ)``, the KL retain term, from logits (:func:`kl_loss`) or
  hidden states (:func:`fused_linear_kl_loss`); :mod:`~fastunlearn.ops._kl_torch` is its CPU path.
- :mod:`~fastunlearn.ops.nll`: the shifted next-token NLL that training objectives, metrics and the
  Fisher estimate all use, and :func:`sequence_logprobs`, its sum per sequence.
- :mod:`~fastunlearn.ops.preference`: the losses on per-sequence log-probabilities (:func:`npo_loss`,
  :func:`simnpo_loss`, :func:`dpo_loss`) and RMU's activation loss (:func:`rmu_loss`).
- :mod:`~fastunlearn.ops.grad_sq`: ``Σ_n (G_nᵀ X_n)²``, the per-example squared weight gradients of a
  linear layer that the Fisher estimate sums.
- :mod:`~fastunlearn.ops._backend`: the ``backend=`` argument every operation shares.
- :mod:`~fastunlearn.ops._workspace`: how an operator shows its scratch memory to memory trackers.

Every operation that touches the vocabulary runs as a PyTorch custom operator
(``torch.ops.fastunlearn.*``) with a fake implementation: ``torch.compile`` traces the public functions
into graphs with those operators as nodes, and ``FakeTensorMode`` runs them on shapes alone, their
scratch memory included, so a memory plan counts what they hold.

Operations take tensors and return tensors. They import PyTorch, and the Triton kernels of
``fastunlearn.kernels`` only when a Triton backend runs; nothing here knows of models, training,
evaluation or the command line.
"""

# The label of a position that carries no loss (prompt, padding), as in PyTorch and Hugging Face.
IGNORE_INDEX = -100
