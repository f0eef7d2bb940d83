"""Diagonal Fisher information of a model's linear layers, and the LoRA initialisation built on it.

- :mod:`~fastunlearn.fisher.layers`: which linear layers an estimate covers (canonical names).
- :mod:`~fastunlearn.fisher.estimate`: :class:`FisherEstimate`, the estimate and its safetensors file;
  :class:`FisherFile`, that file written layer by layer.
- :mod:`~fastunlearn.fisher.passes`: one pass of a data set, a forward and a backward per batch with
  hooks feeding :func:`fastunlearn.ops.grad_sq.per_example_grad_sq` (SPEC §3.1); checkpointing-safe.
- :mod:`~fastunlearn.fisher.budget`: memory sizes, the groups of layers whose accumulators fit a budget.
- :mod:`~fastunlearn.fisher.estimator`: :func:`estimate_fisher`, the whole estimate, group by group;
  :func:`save_fisher`, the same written to its file as it is computed.
- :mod:`~fastunlearn.fisher.row_weights`: :func:`fila_row_weights`, FILA's row weights streamed group
  by group without holding an estimate, and :class:`FilaRowWeights`, their file.
- :mod:`~fastunlearn.fisher.fila`: :func:`fila_init`, Fisher-initialised LoRA (SPEC §3.2).
- :mod:`~fastunlearn.fisher.export`: :func:`save_adapter` / :func:`save_merged` for the original base
  (collected one layer at a time, also from ZeRO-3 partitioned weights).

This layer uses :mod:`fastunlearn.ops` and :mod:`fastunlearn.models.loading`; ``peft`` only when a model
brings it. It knows nothing of training loops, evaluation or the command line.
"""

from fastunlearn.fisher.budget import parse_bytes
from fastunlearn.fisher.estimate import FISHER_MODES, FisherEstimate, FisherFile
from fastunlearn.fisher.estimator import estimate_fisher, save_fisher
from fastunlearn.fisher.export import (
    AdapterExport,
    adapter_export,
    merged_state_dict,
    save_adapter,
    save_merged,
    write_adapter,
)
from fastunlearn.fisher.fila import (
    SOLVERS,
    FilaInit,
    fila_factors,
    fila_factors_from_row_weights,
    fila_init,
    fila_record,
    lora_layers,
)
from fastunlearn.fisher.layers import linear_layers, select_linear_layers
from fastunlearn.fisher.row_weights import FilaRowWeights, fila_row_weights

__all__ = [
    "FISHER_MODES",
    "SOLVERS",
    "AdapterExport",
    "FilaInit",
    "FilaRowWeights",
    "FisherEstimate",
    "FisherFile",
    "adapter_export",
    "estimate_fisher",
    "fila_factors",
    "fila_factors_from_row_weights",
    "fila_init",
    "fila_record",
    "fila_row_weights",
    "linear_layers",
    "lora_layers",
    "merged_state_dict",
    "parse_bytes",
    "save_adapter",
    "save_fisher",
    "save_merged",
    "select_linear_layers",
    "write_adapter",
]
