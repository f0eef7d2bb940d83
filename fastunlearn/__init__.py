"""fastunlearn: fused kernels and a LoRA training loop for LLM unlearning (IHL + FILA, ICLR 2025).

Importing the package imports PyTorch only; Triton is loaded the first time a Triton backend runs,
and the training, evaluation and command-line layers load on first use.
"""

from fastunlearn.fila import fila_init, save_adapter, save_merged
from fastunlearn.fisher import FisherEstimate, estimate_fisher, per_example_grad_sq
from fastunlearn.ihl import IHLLoss, ihl_loss, ihl_paper_formulation, ihl_reference
from fastunlearn.ihl_linear import fused_linear_ihl_loss

__version__ = "0.1.0"

__all__ = [
    "FisherEstimate",
    "IHLLoss",
    "__version__",
    "estimate_fisher",
    "fila_init",
    "fused_linear_ihl_loss",
    "ihl_loss",
    "ihl_paper_formulation",
    "ihl_reference",
    "per_example_grad_sq",
    "save_adapter",
    "save_merged",
]
