"""Diagonal Fisher information of a model's linear layers, and the Fisher-initialised LoRA (FILA) built
on it (Cha et al. 2025, arXiv 2408.06621). Uses :mod:`fastunlearn.ops` and :mod:`fastunlearn.models`;
knows nothing of training loops, evaluation or the command line."""

from fastunlearn.fisher.budget import linear_layers, parse_bytes, select_linear_layers
from fastunlearn.fisher.estimate import FISHER_MODES, FisherEstimate, FisherFile, estimate_fisher, save_fisher
from fastunlearn.fisher.export import (
    adapter_export,
    merged_state_dict,
    save_adapter,
    save_merged,
    write_adapter,
)
from fastunlearn.fisher.fila import SOLVERS, fila_factors, fila_init, fila_record, lora_layers
from fastunlearn.fisher.row_weights import FilaRowWeights, fila_row_weights

__all__ = [
    "FISHER_MODES",
    "SOLVERS",
    "FilaRowWeights",
    "FisherEstimate",
    "FisherFile",
    "adapter_export",
    "estimate_fisher",
    "fila_factors",
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
