"""fastunlearn: fused kernels and a LoRA training loop for LLM unlearning (IHL + FILA, Cha et al. 2025).

Importing the package imports nothing heavy: every public name is loaded on first use, so
``fastunlearn --help`` answers at once.
"""

import logging

__version__ = "0.1.0"

# bitsandbytes, which peft imports whenever it is installed, looks for an optional CPU kernel on the
# Hugging Face Hub at import on CPUs with AVX512-BF16 and logs a warning when it cannot have it (offline,
# or untrusted; through Hugging Face's `kernels`, which logs too when offline); its own kernels run
# instead, and the warnings would open every command.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
logging.getLogger("kernels._internals.hf_hub").setLevel(logging.ERROR)

# name -> (module, attribute of it; None: the module itself)
_LAZY = {
    "FisherEstimate": ("fastunlearn.fisher", "FisherEstimate"),
    "estimate_fisher": ("fastunlearn.fisher", "estimate_fisher"),
    "fila_init": ("fastunlearn.fisher", "fila_init"),
    "save_adapter": ("fastunlearn.fisher", "save_adapter"),
    "save_merged": ("fastunlearn.fisher", "save_merged"),
    "fused_linear_ihl_loss": ("fastunlearn.ops.fused_linear", "fused_linear_ihl_loss"),
    "fused_linear_nll_loss": ("fastunlearn.ops.fused_linear", "fused_linear_nll_loss"),
    "kl_loss": ("fastunlearn.ops.kl", "kl_loss"),
    "fused_linear_kl_loss": ("fastunlearn.ops.kl", "fused_linear_kl_loss"),
    "sequence_logprobs": ("fastunlearn.ops.nll", "sequence_logprobs"),
    "npo_loss": ("fastunlearn.ops.preference", "npo_loss"),
    "simnpo_loss": ("fastunlearn.ops.preference", "simnpo_loss"),
    "dpo_loss": ("fastunlearn.ops.preference", "dpo_loss"),
    "rmu_loss": ("fastunlearn.ops.preference", "rmu_loss"),
    "nll_loss": ("fastunlearn.ops.ihl", "nll_loss"),
    "patch": ("fastunlearn.models.patching", "patch"),
    "unpatch": ("fastunlearn.models.patching", "unpatch"),
    "per_example_grad_sq": ("fastunlearn.ops.grad_sq", "per_example_grad_sq"),
    "IHLLoss": ("fastunlearn.ops.ihl", "IHLLoss"),
    "ihl_loss": ("fastunlearn.ops.ihl", "ihl_loss"),
    "unlearn": ("fastunlearn.training.pipeline", "unlearn"),
    "UnlearnConfig": ("fastunlearn.options.unlearn", "UnlearnConfig"),
    "UnlearnResult": ("fastunlearn.training.pipeline", "UnlearnResult"),
    "UnlearnTrainer": ("fastunlearn.training.trainer", "UnlearnTrainer"),
    "evaluate": ("fastunlearn.evaluation", "evaluate"),
    "metrics": ("fastunlearn.evaluation.metrics", None),
}


def __getattr__(name: str):
    import importlib
    import importlib.util

    if name not in _LAZY:
        # Submodules as attributes: `import fastunlearn; fastunlearn.fisher...`.
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f"{__name__}.{name}")
        raise AttributeError(f"module 'fastunlearn' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


__all__ = ["__version__", *_LAZY]
