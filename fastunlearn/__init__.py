"""fastunlearn: fused kernels and a LoRA training loop for LLM unlearning (IHL + FILA, ICLR 2025).

Importing the package imports PyTorch only; Triton is loaded the first time a Triton backend runs,
and the training, evaluation and command-line layers load on first use.
"""

from fastunlearn.fisher import FisherEstimate, estimate_fisher, fila_init, save_adapter, save_merged
from fastunlearn.ops.fused_linear import fused_linear_ihl_loss, fused_linear_nll_loss
from fastunlearn.ops.grad_sq import per_example_grad_sq
from fastunlearn.ops.ihl import IHLLoss, ihl_loss, ihl_paper_formulation, ihl_reference, nll_loss
from fastunlearn.patching import patch, unpatch

__version__ = "0.1.0"

# The training and evaluation layers import transformers and peft: loaded on first attribute access.
# name -> (module, attribute of it; None: the module itself)
_LAZY = {
    "unlearn": ("fastunlearn.training.run", "unlearn"),
    "UnlearnConfig": ("fastunlearn.training.config", "UnlearnConfig"),
    "UnlearnResult": ("fastunlearn.training.config", "UnlearnResult"),
    "UnlearnTrainer": ("fastunlearn.training.trainer", "UnlearnTrainer"),
    "evaluate": ("fastunlearn.evaluation", "evaluate"),
    "metrics": ("fastunlearn.evaluation.metrics", None),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'fastunlearn' has no attribute {name!r}")
    import importlib

    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


__all__ = [
    "FisherEstimate",
    "IHLLoss",
    "UnlearnConfig",
    "UnlearnResult",
    "UnlearnTrainer",
    "__version__",
    "estimate_fisher",
    "evaluate",
    "fila_init",
    "fused_linear_ihl_loss",
    "fused_linear_nll_loss",
    "ihl_loss",
    "ihl_paper_formulation",
    "ihl_reference",
    "metrics",
    "nll_loss",
    "patch",
    "per_example_grad_sq",
    "save_adapter",
    "save_merged",
    "unlearn",
    "unpatch",
]
