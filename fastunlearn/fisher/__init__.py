"""Diagonal Fisher information of a model's linear layers, and the LoRA initialisation built on it.

- :mod:`~fastunlearn.fisher.layers`: which linear layers an estimate covers (canonical names).
- :mod:`~fastunlearn.fisher.estimate`: :class:`FisherEstimate`, the estimate and its safetensors file.
- :mod:`~fastunlearn.fisher.estimator`: :func:`estimate_fisher`, one forward and one backward per batch
  with hooks feeding :func:`fastunlearn.ops.grad_sq.per_example_grad_sq` (SPEC §3.1).
- :mod:`~fastunlearn.fisher.fila`: :func:`fila_init`, Fisher-initialised LoRA (SPEC §3.2).
- :mod:`~fastunlearn.fisher.export`: :func:`save_adapter` / :func:`save_merged` for the original base.

This layer uses :mod:`fastunlearn.ops` and :mod:`fastunlearn.modeling`; ``peft`` only when a model
brings it. It knows nothing of training loops, evaluation or the command line.
"""

from fastunlearn.fisher.estimate import FISHER_MODES, FisherEstimate
from fastunlearn.fisher.estimator import estimate_fisher
from fastunlearn.fisher.export import merged_state_dict, save_adapter, save_merged
from fastunlearn.fisher.fila import SOLVERS, FilaInit, fila_factors, fila_init, fila_record, lora_layers
from fastunlearn.fisher.layers import linear_layers, select_linear_layers

__all__ = [
    "FISHER_MODES",
    "SOLVERS",
    "FilaInit",
    "FisherEstimate",
    "estimate_fisher",
    "fila_factors",
    "fila_init",
    "fila_record",
    "linear_layers",
    "lora_layers",
    "merged_state_dict",
    "save_adapter",
    "save_merged",
    "select_linear_layers",
]
