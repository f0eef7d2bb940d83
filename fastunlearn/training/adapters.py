"""What trains: LoRA, FILA's Fisher-initialised adapters (Cha et al., ICLR 2025) or every weight (RMU:
its MLP down-projections); the fixed reference log-probabilities of NPO and DPO; and what a finished run
writes of it: the adapter or the whole model, and the merged model."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from fastunlearn import data as fdata
from fastunlearn import fisher
from fastunlearn._io import write_dir
from fastunlearn.engines import distributed
from fastunlearn.engines.base import Engine
from fastunlearn.methods.objectives import sequence_logprobs
from fastunlearn.methods.rmu import down_projections, resolve_rmu_layers
from fastunlearn.models.devices import autocast, training_device
from fastunlearn.models.loading import quiet_peft_wrap
from fastunlearn.models.naming import unwrap_model
from fastunlearn.options.unlearn import UnlearnConfig

ROW_WEIGHTS = os.path.join("fisher", "row_weights.safetensors")


def _enable_gradient_checkpointing(model: nn.Module) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # With frozen embeddings the checkpointed blocks get inputs that do not require grad, and nothing
    # inside them would train: make the embedding output require grad.
    model.enable_input_require_grads()
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False


def trainable_model(model: nn.Module, cfg: UnlearnConfig) -> nn.Module:
    """``model`` as it trains: every weight (RMU: its down-projections) for ``init="full"``, else with
    fresh LoRA adapters (RMU: on its down-projections)."""
    if cfg.gradient_checkpointing:
        _enable_gradient_checkpointing(model)
    targets = None  # RMU trains its down-projections alone
    if cfg.method_spec().forget == "rmu":
        _, layers = resolve_rmu_layers(model.config, cfg.rmu_layer, cfg.rmu_train_layers)
        targets = down_projections(model, layers)
    if cfg.init == "full":
        trained = None if targets is None else {f"{name}.weight" for name in targets}
        for name, p in model.named_parameters():
            p.requires_grad_(trained is None or name in trained)
        return model
    from peft import LoraConfig, get_peft_model

    if targets is None:
        targets = cfg.target_modules if cfg.target_modules is not None else "all-linear"
    lora = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
        bias="none", task_type="CAUSAL_LM",
    )  # fmt: skip
    torch.manual_seed(cfg.seed)  # peft draws A at random
    with quiet_peft_wrap():
        return get_peft_model(model, lora)


def initialise_adapters(
    model: nn.Module,
    cfg: UnlearnConfig,
    checked: Any,
    dataset: fdata.PairedDataset,
    build_dir: str,
    engine: Engine,
) -> tuple[nn.Module, dict[str, str]]:
    """The model ready to train (wrapped with LoRA unless ``init="full"``) and the files FILA wrote: its
    row weights (computed, or reloaded on resume), from which the adapters are initialised."""
    model = trainable_model(model, cfg)
    if cfg.init != "fila":
        return model, {}
    # Fisher over one pass of the forget set and of the retain examples paired with it.
    paired = [checked.retain[j] for j in dataset.pairing] if dataset.pairing else []
    if not paired:
        raise ValueError("init='fila' needs a retain set (relative Fisher information)")
    path = os.path.join(build_dir, ROW_WEIGHTS)
    if distributed.on_main(lambda: os.path.isfile(path)):
        row_weights = fisher.FilaRowWeights.load(path)
    else:
        batches = (
            fdata.batches(ex, checked.pad_id, cfg.fisher_batch_size) for ex in (checked.forget, paired)
        )
        row_weights = fisher.fila_row_weights(
            model, *batches, target_modules=cfg.target_modules, mode=cfg.fisher_mode, eps=cfg.fila_eps,
            max_memory=cfg.fisher_memory, progress=cfg.progress,
        )  # fmt: skip
        distributed.on_main(lambda: row_weights.save(path, overwrite=True))
    engine.after_fisher()
    fisher.fila_init(model, row_weights=row_weights, eps=cfg.fila_eps, solver=cfg.fila_solver, seed=cfg.seed)
    return model, {"row_weights": path}


def reference_logprobs(
    model: nn.Module, parts: dict[str, list[fdata.Example]], cfg: UnlearnConfig, precision: str, pad_id: int
) -> dict[str, torch.Tensor]:
    """Per-sequence log-probabilities of each part's examples under the model before unlearning (for
    FILA ``W_res + s·B₀A₀ = W``), computed as the training step computes the policy's."""
    with autocast(precision, training_device()):
        return {
            name: sequence_logprobs(model, fdata.batches(examples, pad_id, cfg.eval_batch_size))
            for name, examples in parts.items()
        }


def collect_outputs(
    model: nn.Module, *, init: str, merge: bool, state_dict: dict | None = None
) -> dict[str, Any]:
    """What :func:`save_outputs` writes, read by every rank (a collective under ZeRO-3) and kept by the
    main one. ``state_dict``: the state an engine gathered itself (FSDP)."""
    keep = distributed.is_main()
    if init == "full":  # whole weights are saved from the model itself, without a copy in memory
        partitioned = any(distributed.is_partitioned(p) for p in model.parameters())
        whole = distributed.gathered_state_dict(unwrap_model(model), keep=keep) if partitioned else None
        return {"model": whole}
    if state_dict is not None and not keep:  # gathered already, into the main process alone
        return {}
    collected: dict[str, Any] = {"adapter": fisher.adapter_export(model, state_dict=state_dict)}
    if merge:
        collected["merged"] = fisher.merged_state_dict(model, keep=keep, state_dict=state_dict)
    return collected


def save_outputs(
    model: nn.Module, tokenizer: Any, collected: dict[str, Any], build: str, *, init: str
) -> dict[str, str]:
    """Write the collected outputs into ``build``; the paths written, by kind."""
    if init == "full":

        def save_full(tmp: str) -> None:
            unwrap_model(model).save_pretrained(tmp, state_dict=collected["model"])
            tokenizer.save_pretrained(tmp)

        return {"model": write_dir(os.path.join(build, "model"), save_full)}
    adapter = fisher.write_adapter(collected["adapter"], os.path.join(build, "adapter"), overwrite=True)
    written = {"adapter": os.fspath(adapter)}
    if "merged" in collected:

        def save_merged_model(tmp: str) -> None:
            fisher.save_merged(model, tmp, overwrite=True, state_dict=collected["merged"])
            tokenizer.save_pretrained(tmp)

        written["merged"] = write_dir(os.path.join(build, "merged"), save_merged_model)
    return written
