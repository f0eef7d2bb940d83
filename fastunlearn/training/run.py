"""The :func:`unlearn` entry point: a model and two data sets in, an unlearned model on disk out.

:func:`unlearn` runs the paper's recipe (Cha et al. 2025 §4; SPEC §3.2) with the options of
:class:`~fastunlearn.training.config.UnlearnConfig`: it loads the model and the data, wraps the model
with LoRA, for ``init="fila"`` estimates the forget and retain Fisher information and re-initialises
the adapters with :func:`fastunlearn.fisher.fila_init`, trains with
:class:`~fastunlearn.training.trainer.UnlearnTrainer`, measures the model before and after, and
writes, atomically::

    output_dir/
      adapter/            peft adapter that loads on the ORIGINAL base model (LoRA / FILA)
      model/              the trained model (init="full")
      merged/             the merged model (merge=True)
      fisher/             forget.safetensors, retain.safetensors (FILA; reused on resume)
      checkpoints/        Trainer checkpoints (resume=True continues from the last one)
      metrics.json        {"before": {"forget", "retain"}, "after": {...}, "train": {...}, "stopping"}
      trajectory.csv/png  metrics at each evaluation during training (stop= / eval_every=)
      run_config.json     every option, the data and model sources, library versions

With a stopping rule (``stop=``, :mod:`fastunlearn.training.stopping_setup`) the model is evaluated on
bounded subsets during training, training stops where the rule says, and everything above is the
state the rule keeps.

A non-empty output directory is refused unless ``overwrite`` (which removes only the entries above)
or ``resume`` (which continues from the last checkpoint of the same run).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from fastunlearn._io import write_dir, write_json
from fastunlearn.modeling import load_model_and_tokenizer, to_training_device
from fastunlearn.training import data as fdata
from fastunlearn.training.config import INITS, UnlearnConfig, UnlearnResult
from fastunlearn.training.methods import METHODS, NEEDS_RETAIN, sequence_logprobs
from fastunlearn.training.stopping_setup import (
    STOPPING_OPTIONS,
    TRAJECTORY_FILES,
    plan_run_stopping,
    prepare_unseen,
    record_inputs,
    stopping_callback,
)
from fastunlearn.training.trainer import build_trainer

# Entries unlearn() writes; overwrite=True removes these and nothing else from output_dir.
OUTPUT_ENTRIES = (
    "adapter",
    "model",
    "merged",
    "fisher",
    "checkpoints",
    "metrics.json",
    "run_config.json",
    *TRAJECTORY_FILES,
)
# Options that may differ between a run and its resumption.
_RESUME_FREE = (
    "resume",
    "overwrite",
    "progress",
    "evaluate",
    "merge",
    "eval_batch_size",
    "logging_steps",
    "callbacks",
    "allow_download",
    "trust_remote_code",
    *STOPPING_OPTIONS,  # a run that evaluates during training is never resumed
)

__all__ = ["OUTPUT_ENTRIES", "check_output_dir", "clear_output_dir", "unlearn"]


# ---------------------------------------------------------------------------------------------------
# Files


def check_output_dir(path: str, *, overwrite: bool, resume: bool) -> None:
    """Refuse a non-empty ``path`` unless ``overwrite`` or ``resume`` (which needs a checkpoint in it)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"output_dir {path!r} exists and is not a directory")
    if resume and not _last_checkpoint(path):
        raise ValueError(f"resume=True but {path!r} holds no checkpoint to resume from")
    if not resume and not overwrite and os.path.isdir(path) and os.listdir(path):
        raise FileExistsError(
            f"output_dir {path!r} is not empty; pass overwrite=True (--overwrite) to replace the run in it "
            "or resume=True (--resume) to continue it"
        )


def clear_output_dir(path: str) -> None:
    """Create ``path`` and remove what an earlier run wrote there (:data:`OUTPUT_ENTRIES`), nothing else."""
    for entry in OUTPUT_ENTRIES:
        target = os.path.join(path, entry)
        if os.path.isdir(target):
            shutil.rmtree(target)
        elif os.path.exists(target):
            os.unlink(target)
    os.makedirs(path, exist_ok=True)


def _last_checkpoint(output_dir: str) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    ckpt_dir = os.path.join(output_dir, "checkpoints")
    return get_last_checkpoint(ckpt_dir) if os.path.isdir(ckpt_dir) else None


# ---------------------------------------------------------------------------------------------------
# Model


def _check_vocab(model: nn.Module, examples: Iterable[fdata.Example], name: str) -> None:
    vocab = model.get_input_embeddings().num_embeddings
    for e in examples:
        if max(e.input_ids) >= vocab:
            raise ValueError(
                f"{e.source}: token id {max(e.input_ids)} is outside the model's vocabulary ({vocab}); "
                f"the tokenizer does not match the model ({name} set)"
            )


def _lora_model(model: nn.Module, cfg: UnlearnConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules if cfg.target_modules is not None else "all-linear",
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(cfg.seed)  # peft draws A at random
    with warnings.catch_warnings():
        # peft probes a property that transformers 5 deprecated; the warning is not the user's business.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora)


def _enable_gradient_checkpointing(model: nn.Module) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # With frozen embeddings the checkpointed blocks get inputs that do not require grad; with the
    # reentrant implementation nothing upstream of them then trains. Make the embedding output
    # require grad so the LoRA weights inside checkpointed blocks train with either implementation.
    model.enable_input_require_grads()
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False


def _fila(model, forget_batches, retain_batches, cfg: UnlearnConfig, output_dir: str) -> dict[str, str]:
    """Estimate (or, on resume, reload) the Fisher information and re-initialise the adapters (SPEC §3.2)."""
    from fastunlearn.fisher import FisherEstimate, estimate_fisher, fila_init

    fisher_dir = os.path.join(output_dir, "fisher")
    paths = {name: os.path.join(fisher_dir, f"{name}.safetensors") for name in ("forget", "retain")}
    if all(os.path.isfile(p) for p in paths.values()):
        estimates = {name: FisherEstimate.load(p) for name, p in paths.items()}
    else:
        estimates = {}
        for name, batches in (("forget", forget_batches), ("retain", retain_batches)):
            estimates[name] = estimate_fisher(
                model,
                batches,
                target_modules=cfg.target_modules,
                mode=cfg.fisher_mode,
                progress=cfg.progress,
            )
            estimates[name].save(paths[name], overwrite=True)
            # Off the accelerator until FILA needs it, a layer at a time: at 7B each estimate is ~24 GiB.
            estimates[name] = estimates[name].to("cpu")
    fila_init(
        model,
        estimates["forget"],
        estimates["retain"],
        eps=cfg.fila_eps,
        solver=cfg.fila_solver,
        seed=cfg.seed,
    )
    return paths


# ---------------------------------------------------------------------------------------------------
# Entry point


def _source_name(data: Any) -> str:
    """How ``run_config.json`` records a data or model source: an absolute path, or in-memory."""
    return os.path.abspath(os.fspath(data)) if isinstance(data, (str, os.PathLike)) else "<in-memory records>"


def _versions() -> dict[str, str]:
    import peft
    import transformers

    from fastunlearn import __version__

    return {
        "fastunlearn": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def _evaluate(model, forget_ex, retain_ex, pad_id: int, cfg: UnlearnConfig) -> dict[str, dict[str, float]]:
    from fastunlearn.evaluation.likelihood import basic_metrics

    return {
        name: basic_metrics(model, fdata.batches(examples, pad_id, cfg.eval_batch_size))
        for name, examples in (("forget", forget_ex), ("retain", retain_ex))
        if examples
    }


def unlearn(
    model: nn.Module | str | os.PathLike,
    tokenizer: Any,
    forget: str | os.PathLike | Iterable[Mapping[str, Any]],
    retain: str | os.PathLike | Iterable[Mapping[str, Any]] | None,
    *,
    method: str = "ihl",
    init: str = "fila",
    output_dir: str | os.PathLike,
    **options: Any,
) -> UnlearnResult:
    """Unlearn ``forget`` from ``model`` while keeping it good on ``retain`` (Cha et al. 2025).

    ``model``: an ``nn.Module`` (a Hugging Face causal LM; modified in place: wrapped with LoRA, and
    for FILA its base weights become the residual ``W − s·B₀A₀``) or a local directory.
    ``tokenizer``: a tokenizer, a local directory, or ``None`` with a model path. ``forget`` /
    ``retain``: JSON Lines paths or iterables of records (see :mod:`fastunlearn.training.data`);
    ``retain`` may be ``None`` only for ``method="ga"``. ``method``: ``"ihl"``, ``"ga"``, ``"gd"``,
    ``"npo"`` (:mod:`fastunlearn.training.methods`). ``init``: ``"fila"``, ``"lora"`` or ``"full"``.
    ``options``: the fields of :class:`UnlearnConfig` (unknown names raise ``TypeError``), among them
    the stopping rule ``stop`` and its ``eval_every``, ``patience``, ``restore``, ``eval_items``,
    ``unseen``, ``reference_model`` (:mod:`fastunlearn.training.stopping_setup`).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {list(METHODS)}")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; expected one of {list(INITS)}")
    valid = {f.name for f in dataclasses.fields(UnlearnConfig)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; valid options are {sorted(valid)}")
    cfg = UnlearnConfig(**options)
    if retain is None and method in NEEDS_RETAIN:
        raise ValueError(f"method {method!r} needs a retain set")
    if retain is None and init == "fila":
        raise ValueError("init='fila' needs a retain set (relative Fisher information); use init='lora'")
    if cfg.fused_linear and method != "ihl":
        raise ValueError(f"fused_linear=True computes the IHL forget term; method {method!r} does not use it")
    output_dir = os.path.abspath(os.fspath(output_dir))
    # The records are read once, here: their formats decide which metrics a stopping rule may read.
    sets = {"forget": forget, **({"retain": retain} if retain is not None else {})}
    records = {
        name: fdata.load_records(data, data_format=cfg.data_format, name=name) for name, data in sets.items()
    }
    plan = plan_run_stopping(cfg, {name: fmt for name, (_, fmt) in records.items()})

    run_config = {
        "method": method,
        "init": init,
        "options": _options_record(cfg),
        "model": _source_name(model)
        if isinstance(model, (str, os.PathLike))
        else getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__,
        "forget": _source_name(forget),
        "retain": None if retain is None else _source_name(retain),
        "versions": _versions(),
    }
    config_path = os.path.join(output_dir, "run_config.json")
    check_output_dir(output_dir, overwrite=cfg.overwrite, resume=cfg.resume)
    if cfg.resume:
        _check_resumable(config_path, run_config)

    model, tokenizer = load_model_and_tokenizer(
        model,
        tokenizer,
        trust_remote_code=cfg.trust_remote_code,
        allow_download=cfg.allow_download,
        dtype=torch.bfloat16 if cfg.bf16 else None,
    )
    to_training_device(model)
    tokenized = {
        name: fdata.tokenize_records(
            recs, tokenizer, data_format=fmt, template=cfg.template, max_length=cfg.max_length
        )
        for name, (recs, fmt) in records.items()
    }
    forget_ex, retain_ex = tokenized["forget"], tokenized.get("retain", [])
    unseen_ex = prepare_unseen(cfg, tokenizer) if plan is not None else []
    for name, examples in (("forget", forget_ex), ("retain", retain_ex), ("unseen", unseen_ex)):
        _check_vocab(model, examples, name)
    pad_id = fdata.pad_id_of(tokenizer)
    dataset = fdata.PairedDataset(forget_ex, retain_ex, seed=cfg.seed)
    # Only now that the model and the data are known to be good is an earlier run replaced.
    if not cfg.resume:
        clear_output_dir(output_dir)
    write_json(config_path, run_config)

    metrics: dict[str, Any] = {}
    if cfg.evaluate:
        metrics["before"] = _evaluate(model, forget_ex, retain_ex, pad_id, cfg)
    extra_callbacks = []
    if plan is not None:  # the rule's reference values are measured on the model before unlearning
        extra_callbacks.append(
            stopping_callback(plan, cfg, model, tokenizer, forget_ex, retain_ex, unseen_ex, output_dir)
        )

    fisher_paths: dict[str, str] = {}
    if cfg.gradient_checkpointing:
        _enable_gradient_checkpointing(model)
    if init == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        model = _lora_model(model, cfg)
        if init == "fila":
            # Fisher over one pass of the forget set and of the retain examples paired with it (SPEC §3.1).
            paired_retain = [retain_ex[j] for j in dataset.pairing] if dataset.pairing else []
            if not paired_retain:
                raise ValueError("init='fila' needs a retain set (relative Fisher information)")
            fisher_paths = _fila(
                model,
                fdata.batches(forget_ex, pad_id, cfg.fisher_batch_size),
                fdata.batches(paired_retain, pad_id, cfg.fisher_batch_size),
                cfg,
                output_dir,
            )
    if method == "npo":
        # The model before unlearning (for FILA: W_res + s·B₀A₀ = W) gives the fixed reference.
        dataset.ref_logp = sequence_logprobs(model, fdata.batches(forget_ex, pad_id, cfg.eval_batch_size))

    trainer = build_trainer(
        model, dataset, pad_id, method=method, cfg=cfg, output_dir=output_dir, extra_callbacks=extra_callbacks
    )
    start = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=_last_checkpoint(output_dir) if cfg.resume else None)
    metrics["train"] = {
        "loss": out.training_loss,
        "global_step": out.global_step,
        "runtime_s": time.perf_counter() - start,
    }
    if plan is not None:  # the callback has put the kept state back: "after" and the files are that state
        metrics["stopping"] = extra_callbacks[0].summary
    if cfg.evaluate:
        metrics["after"] = _evaluate(model, forget_ex, retain_ex, pad_id, cfg)

    result = UnlearnResult(
        model=model,
        tokenizer=tokenizer,
        output_dir=output_dir,
        metrics=metrics,
        metrics_path=os.path.join(output_dir, "metrics.json"),
        run_config_path=config_path,
        fisher_paths=fisher_paths,
    )
    _save_outputs(result, init=init, merge=cfg.merge)
    write_json(result.metrics_path, metrics)
    return result


def _options_record(cfg: UnlearnConfig) -> dict[str, Any]:
    """The options as JSON values (callbacks by class name)."""
    options = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    options["callbacks"] = [type(cb).__name__ for cb in cfg.callbacks or ()]
    options.update(record_inputs(cfg))
    return options


def _check_resumable(config_path: str, run_config: dict[str, Any]) -> None:
    if not os.path.isfile(config_path):
        raise ValueError(f"cannot resume: {config_path} is missing")
    with open(config_path, encoding="utf-8") as f:
        saved = json.load(f)
    mismatched = [key for key in ("method", "init", "forget", "retain") if saved.get(key) != run_config[key]]
    mismatched += [
        f"options.{k}"
        for k, v in run_config["options"].items()
        if k not in _RESUME_FREE and saved.get("options", {}).get(k) != v
    ]
    if mismatched:
        raise ValueError(f"cannot resume: the run in {os.path.dirname(config_path)} differs in {mismatched}")


def _save_outputs(result: UnlearnResult, *, init: str, merge: bool) -> None:
    model, out = result.model, result.output_dir
    if init == "full":

        def save_full(tmp: str) -> None:
            model.save_pretrained(tmp)
            result.tokenizer.save_pretrained(tmp)

        result.model_path = write_dir(os.path.join(out, "model"), save_full)
        return
    from fastunlearn.fisher import save_adapter, save_merged

    result.adapter_path = os.fspath(save_adapter(model, os.path.join(out, "adapter"), overwrite=True))
    if merge:

        def save_merged_model(tmp: str) -> None:
            save_merged(model, tmp, overwrite=True)
            result.tokenizer.save_pretrained(tmp)

        result.merged_path = write_dir(os.path.join(out, "merged"), save_merged_model)
