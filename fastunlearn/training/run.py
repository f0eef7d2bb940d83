"""The :func:`unlearn` entry point: a model and two data sets in, an unlearned model on disk out.

:func:`unlearn` runs the paper's recipe (Cha et al. 2025 §4; SPEC §3.2) with the options of
:class:`~fastunlearn.training.config.UnlearnConfig`: it loads the model and the data, wraps the model
with LoRA, for ``init="fila"`` computes FILA's row weights from the forget and retain Fisher
information (:func:`fastunlearn.fisher.fila_row_weights`, group by group within ``fisher_memory``)
and re-initialises the adapters with :func:`fastunlearn.fisher.fila_init`, patches the model
(:func:`fastunlearn.patch`: the loss terms from the last hidden states, fused where the architecture
allows) and trains it with :class:`~fastunlearn.training.trainer.UnlearnTrainer` at the resolved
precision (:mod:`fastunlearn.training.precision`), measures it before and after, unpatches it, and
writes, atomically::

    output_dir/
      adapter/            peft adapter that loads on the ORIGINAL base model (LoRA / FILA)
      model/              the trained model (init="full")
      merged/             the merged model (merge=True)
      fisher/             row_weights.safetensors: FILA's row weights (reused on resume)
      checkpoints/        Trainer checkpoints (resume=True continues from the last one; with
                          evaluation during training, beside each its stopping record)
      metrics.json        {"before": {"forget", "retain"}, "after": {...}, "train": {...}, "stopping"}
      trajectory.csv/png  metrics at each evaluation during training (stop= / eval_every=)
      run_config.json     every option, the resolved precision, the data and model sources, versions

Everything that can be wrong with the arguments is checked before the model's weights load: the
output directory (:func:`fastunlearn.training.outputs.plan_run`), then the model path, tokenizer, data,
vocabulary, target modules and rank (:func:`fastunlearn.training.preflight.preflight`), then whether
the run's memory plan fits the device (:mod:`fastunlearn.training.memory_check`; ``memory_check=False``
skips it). A finished run in ``output_dir`` is refused unless ``overwrite``, which builds the new run
beside it and swaps it in only when it finishes; an interrupted run is continued by ``resume`` and
replaced by a plain run (:mod:`fastunlearn.training.outputs` defines the states). ``run_config.json``
records the equivalent ``fastunlearn unlearn`` command line when there is one.

With a stopping rule (``stop=``, :mod:`fastunlearn.training.stopping_setup`) the model is evaluated on
bounded subsets during training, training stops where the rule says, and everything above is the
state the rule keeps.

Under ``torchrun`` / ``accelerate launch`` (:mod:`fastunlearn.distributed`) every process runs this
function: the main process alone plans, clears, stages and publishes the output directory and writes
every file (the others wait for it and share its outcome, errors included); the read-only checks run
on every rank and any rank's error stops them all; the Fisher passes share the batches; ``Trainer``
runs DDP, or with ``fsdp`` trains the model sharded after FILA (:mod:`fastunlearn.training.fsdp`),
or with ``deepspeed=CONFIG`` under DeepSpeed ZeRO (:mod:`fastunlearn.training.deepspeed_setup`: the
config checked before loading, ZeRO-3's partitioned loading and its passes before training).
``metrics.json``'s ``before``/``after`` are evaluated with the ranks sharing the examples (their
per-example numbers gathered, the means taken on all of them) and ``train.loss`` is the mean over the
ranks; the stopping rule's evaluations are shared the same way. The outputs are collected by every
rank (a collective under FSDP and ZeRO-3: gathered one tensor or layer at a time) and written by the
main one. ``run_config.json`` records the number of processes, and ``resume`` refuses a different one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from fastunlearn import distributed
from fastunlearn._io import write_dir, write_json
from fastunlearn.modeling import (
    load_model_and_tokenizer,
    quiet_peft_wrap,
    to_training_device,
    training_device,
    unwrap_model,
)
from fastunlearn.patching import fused_blocker, patch, unpatch
from fastunlearn.training import data as fdata
from fastunlearn.training import fsdp, outputs
from fastunlearn.training.config import INITS, UnlearnConfig, UnlearnResult
from fastunlearn.training.deepspeed_setup import DeepSpeedSetup, prepare_deepspeed
from fastunlearn.training.flags import command_line
from fastunlearn.training.memory_check import check_memory
from fastunlearn.training.methods import METHODS, NEEDS_RETAIN, sequence_logprobs
from fastunlearn.training.precision import autocast, load_dtype, resolve_training_precision, weights_dtype
from fastunlearn.training.preflight import check_vocab, preflight, read_data
from fastunlearn.training.stopping_setup import (
    plan_run_stopping,
    prepare_unseen,
    record_inputs,
    stopping_callback,
)
from fastunlearn.training.trainer import build_trainer

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
    "fisher_memory",  # the grouping of the Fisher passes does not change their result
    "fused",  # how the loss is computed, not which loss
    "memory_check",
    "ihl_backend",
    "generate_within",  # what the trajectory shows around the crossing, not what is decided
)

__all__ = ["unlearn"]


# ---------------------------------------------------------------------------------------------------
# Model


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
    with quiet_peft_wrap():
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


def _fila(
    model, forget_batches, retain_batches, cfg: UnlearnConfig, output_dir: str, ds: DeepSpeedSetup | None
) -> dict[str, str]:
    """Compute (or, on resume, reload) FILA's row weights and re-initialise the adapters (SPEC §3.2).

    Only the row weights are kept (``fisher/row_weights.safetensors``, megabytes at 7B): they are all
    FILA takes from the Fisher estimates, and they re-create the same initialisation on resume.
    """
    from fastunlearn.fisher import FilaRowWeights, fila_init, fila_row_weights

    path = os.path.join(output_dir, "fisher", "row_weights.safetensors")
    if distributed.on_main(lambda: os.path.isfile(path)):
        row_weights = FilaRowWeights.load(path)
    else:
        row_weights = fila_row_weights(
            model,
            forget_batches,
            retain_batches,
            target_modules=cfg.target_modules,
            mode=cfg.fisher_mode,
            eps=cfg.fila_eps,
            max_memory=cfg.fisher_memory,
            progress=cfg.progress,
        )
        distributed.on_main(lambda: row_weights.save(path, overwrite=True))
    if ds is not None:
        ds.release()  # ZeRO-3: the weights the passes left gathered, partitioned before FILA writes
    fila_init(model, row_weights=row_weights, eps=cfg.fila_eps, solver=cfg.fila_solver, seed=cfg.seed)
    return {"row_weights": path}


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
    from fastunlearn.evaluation.likelihood import answer_metrics, example_stats

    return {  # the ranks share the examples; every rank gets the metrics of all of them
        name: answer_metrics(example_stats(model, examples, pad_id, cfg.eval_batch_size))
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
    ``options``: the fields of :class:`UnlearnConfig` (unknown names raise ``TypeError``).
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
    precision = resolve_training_precision(
        cfg.precision,
        training_device(),
        init=init,
        weights=None if isinstance(model, (str, os.PathLike)) else weights_dtype(model),
    )
    output_dir = os.path.abspath(os.fspath(output_dir))
    distributed.init_from_env()  # under torchrun / accelerate launch: join the ranks' process group
    fsdp_plan = None
    if cfg.fsdp is not None:  # refused here, before anything is read or written, if it cannot run
        fsdp_plan = fsdp.check_fsdp_run(cfg.fsdp, init, resume=cfg.resume)
    ds: DeepSpeedSetup | None = None
    if cfg.deepspeed is not None:  # read and checked against the options on the main process
        ds = distributed.on_main(
            lambda: prepare_deepspeed(cfg.deepspeed, cfg, precision, distributed.world_size())
        )

    run_config = {
        "method": method,
        "init": init,
        "options": _options_record(cfg),
        "model": _source_name(model)
        if isinstance(model, (str, os.PathLike))
        else getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__,
        "forget": _source_name(forget),
        "retain": None if retain is None else _source_name(retain),
        "command": command_line(
            _absolute(model),
            _absolute(tokenizer),
            _absolute(forget),
            _absolute(retain),
            method=method,
            init=init,
            output_dir=output_dir,
            options=options,
        ),
        "precision": precision,
        "versions": _versions(),
        "world_size": distributed.world_size(),  # the data order and global batch depend on it
    }
    # Every check that can fail runs before the weights load and before anything is written. Under
    # several processes only the main one reads and writes the output directory (module docstring).
    # The records' formats decide which metrics a stopping rule may read; checked first.
    data = distributed.on_all(lambda: read_data(forget, retain, data_format=cfg.data_format))
    plan = distributed.on_all(lambda: plan_run_stopping(cfg, {name: fmt for name, (_, fmt) in data.items()}))
    dirs = distributed.on_main(lambda: _plan(output_dir, cfg, run_config))
    config_path = os.path.join(dirs.build, "run_config.json")
    checked = distributed.on_all(lambda: preflight(model, tokenizer, data, init=init, cfg=cfg))
    if cfg.memory_check:  # the main process decides; its refusal is every rank's
        engine = "zero3" if ds is not None and ds.stage == 3 else "fsdp" if cfg.fsdp else "ddp"
        distributed.on_main(lambda: _check_memory(model, checked, method, init, cfg, precision, engine))
    unseen_ex = prepare_unseen(cfg, checked.tokenizer) if plan is not None else []
    forget_ex, retain_ex = checked.forget, checked.retain

    if ds is not None:
        ds.sharded_loading()  # ZeRO-3: from_pretrained partitions every weight as it reads it
    model, tokenizer = load_model_and_tokenizer(
        model,
        checked.tokenizer,
        trust_remote_code=cfg.trust_remote_code,
        allow_download=cfg.allow_download,
        dtype=load_dtype(precision, init),
    )
    if cfg.fused and (reason := fused_blocker(model)) is not None:  # refused before anything is written
        raise ValueError(f"fused=True: cannot compute the losses of {type(model).__name__} fused: {reason}")
    # The loss terms inside the model's forward (fused where possible; labels are checked once, by the
    # preflight). Patched now, so that fused=False takes the logits path in every pass of the run: the
    # evaluations, the Fisher passes and training (LoRA and the engines wrap this same causal LM).
    patch(model, fused=cfg.fused, backend=cfg.ihl_backend, validate=False)
    if ds is None or not ds.zero3:  # ZeRO-3 shards are already on this rank's device
        to_training_device(model)
    check_vocab(model, unseen_ex, "unseen")
    pad_id = fdata.pad_id_of(tokenizer)
    dataset = fdata.PairedDataset(forget_ex, retain_ex, seed=cfg.seed)
    distributed.on_main(lambda: (outputs.start_run(dirs), write_json(config_path, run_config)))

    metrics: dict[str, Any] = {}
    # ZeRO-3: the passes before training fetch the partitioned weights through DeepSpeed's hooks.
    fetching = contextlib.ExitStack()
    if ds is not None:
        fetching.enter_context(ds.fetching(model))
    if cfg.evaluate:
        metrics["before"] = _evaluate(model, forget_ex, retain_ex, pad_id, cfg)
    extra_callbacks = []
    if plan is not None:  # the rule's reference values are measured on the model before unlearning
        extra_callbacks.append(
            stopping_callback(plan, cfg, model, tokenizer, forget_ex, retain_ex, unseen_ex, dirs.build)
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
                dirs.build,
                ds,
            )
    try:
        if method == "npo":
            # The model before unlearning (for FILA: W_res + s·B₀A₀ = W) gives the fixed reference,
            # computed as the training step computes the policy term.
            with autocast(precision, training_device()):
                batches = fdata.batches(forget_ex, pad_id, cfg.eval_batch_size)
                dataset.ref_logp = sequence_logprobs(model, batches)
        fetching.close()  # Trainer's DeepSpeed engine installs its own hooks

        wrapped = None
        if fsdp_plan is not None:  # after the Fisher passes and FILA (fastunlearn.training.fsdp)
            fsdp.shard_model(model, fsdp_plan)
            wrapped = fsdp.ShardedTrainingView(model, precision, training_device())
        trainer = build_trainer(
            model,
            dataset,
            pad_id,
            method=method,
            cfg=cfg,
            output_dir=dirs.build,
            precision=precision,
            extra_callbacks=extra_callbacks,
            wrapped_model=wrapped,
            deepspeed=None if ds is None else ds.config,
        )
        start = time.perf_counter()
        checkpoint = outputs.last_checkpoint(dirs.build) if dirs.resume else None
        if checkpoint is not None and plan is not None:  # the evaluations up to it are not repeated
            extra_callbacks[0].resume_from(checkpoint)
        out = trainer.train(resume_from_checkpoint=checkpoint)
        metrics["train"] = {
            "loss": distributed.mean(out.training_loss),  # Trainer adds its last interval unreduced
            "global_step": out.global_step,
            "runtime_s": time.perf_counter() - start,
        }
        if plan is not None:  # the callback has put the kept state back: "after" and the files are that state
            summary = dict(extra_callbacks[0].summary)
            for key in ("trajectory_csv", "trajectory_png"):  # where they are once the run is published
                if summary.get(key):
                    summary[key] = os.path.join(output_dir, os.path.basename(summary[key]))
            metrics["stopping"] = summary
        if cfg.evaluate:
            metrics["after"] = _evaluate(model, forget_ex, retain_ex, pad_id, cfg)

        # Collected on every rank (a collective under FSDP and ZeRO-3), kept and written by the main process.
        gathered = fsdp.gathered_state(model, trainable_only=not cfg.merge) if wrapped is not None else None
        exported = _collect_outputs(model, init=init, merge=cfg.merge, state_dict=gathered)

        def publish() -> dict[str, str]:
            written = _save_outputs(model, tokenizer, exported, dirs.build, init=init)
            # metrics.json last: it marks the run finished
            write_json(os.path.join(dirs.build, outputs.COMPLETE_MARKER), metrics)
            outputs.finish_run(dirs)
            return written

        written = distributed.on_main(publish)  # the other ranks wait here until the run is published
    finally:
        fetching.close()
        unpatch(model)

    def published(path: str) -> str:
        return os.path.join(output_dir, os.path.relpath(path, dirs.build))

    return UnlearnResult(
        model=model,
        tokenizer=tokenizer,
        output_dir=output_dir,
        metrics=metrics,
        metrics_path=os.path.join(output_dir, outputs.COMPLETE_MARKER),
        run_config_path=published(config_path),
        adapter_path=published(written["adapter"]) if "adapter" in written else None,
        model_path=published(written["model"]) if "model" in written else None,
        merged_path=published(written["merged"]) if "merged" in written else None,
        fisher_paths={name: published(path) for name, path in fisher_paths.items()},
    )


def _absolute(source: Any) -> Any:
    """A path made absolute (the recorded command must run from anywhere); anything else as it is."""
    return os.path.abspath(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else source


def _check_memory(
    model, checked, method: str, init: str, cfg: UnlearnConfig, precision: str, engine: str
) -> None:
    module = model if isinstance(model, nn.Module) else None
    check_memory(
        checked.config,
        checked.forget + checked.retain,
        method=method,
        init=init,
        cfg=cfg,
        weights=load_dtype(precision, init) if module is None else weights_dtype(module),
        device=training_device(),
        world_size=distributed.world_size(),
        engine=engine,
        model=module,
    )


def _options_record(cfg: UnlearnConfig) -> dict[str, Any]:
    """The options as JSON values (callbacks by class name)."""
    options = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    options["callbacks"] = [type(cb).__name__ for cb in cfg.callbacks or ()]
    options.update(record_inputs(cfg))
    return options


def _plan(output_dir: str, cfg: UnlearnConfig, run_config: dict[str, Any]) -> outputs.RunDirs:
    dirs = outputs.plan_run(output_dir, overwrite=cfg.overwrite, resume=cfg.resume)
    if dirs.resume:
        _check_resumable(os.path.join(dirs.build, "run_config.json"), run_config)
    return dirs


def _check_resumable(config_path: str, run_config: dict[str, Any]) -> None:
    if not os.path.isfile(config_path):
        raise ValueError(f"cannot resume: {config_path} is missing")
    with open(config_path, encoding="utf-8") as f:
        saved = json.load(f)
    started = saved.get("world_size", 1)  # runs recorded before it was kept ran in one process
    if started != run_config["world_size"]:
        raise ValueError(
            f"cannot resume: the run in {os.path.dirname(config_path)} was started on {started} process(es), "
            f"this one has {run_config['world_size']} (the data order and global batch depend on it)"
        )
    mismatched = [key for key in ("method", "init", "forget", "retain") if saved.get(key) != run_config[key]]
    mismatched += [
        f"options.{k}"
        for k, v in run_config["options"].items()
        if k not in _RESUME_FREE and saved.get("options", {}).get(k) != v
    ]
    if mismatched:
        raise ValueError(f"cannot resume: the run in {os.path.dirname(config_path)} differs in {mismatched}")


def _collect_outputs(
    model: nn.Module, *, init: str, merge: bool, state_dict: dict | None = None
) -> dict[str, Any]:
    """What :func:`_save_outputs` writes, read from the model by every rank (under ZeRO-3 the weights
    are gathered one module at a time, a collective) and kept by the main process only.
    ``state_dict``: the gathered state of an FSDP-sharded LoRA model
    (:func:`fastunlearn.training.fsdp.gathered_state`), read instead of the model."""
    from fastunlearn.sharded import gathered_state_dict, is_partitioned

    keep = distributed.is_main()
    if init == "full":  # whole weights are saved from the model itself, without a copy in memory
        partitioned = any(is_partitioned(p) for p in model.parameters())
        return {"model": gathered_state_dict(unwrap_model(model), keep=keep) if partitioned else None}
    if state_dict is not None and not keep:  # FSDP: gathered already, into the main process alone
        return {}
    from fastunlearn.fisher import adapter_export, merged_state_dict

    collected: dict[str, Any] = {"adapter": adapter_export(model, state_dict=state_dict)}
    if merge:
        collected["merged"] = merged_state_dict(model, keep=keep, state_dict=state_dict)
    return collected


def _save_outputs(
    model: nn.Module, tokenizer: Any, collected: dict[str, Any], build: str, *, init: str
) -> dict[str, str]:
    """Write the trained model into ``build``: the full model (``init="full"``) or the adapter, and the
    merged model if collected; returns the paths written by kind."""
    if init == "full":

        def save_full(tmp: str) -> None:
            unwrap_model(model).save_pretrained(tmp, state_dict=collected["model"])
            tokenizer.save_pretrained(tmp)

        return {"model": write_dir(os.path.join(build, "model"), save_full)}
    from fastunlearn.fisher import save_merged, write_adapter

    adapter = write_adapter(collected["adapter"], os.path.join(build, "adapter"), overwrite=True)
    written = {"adapter": os.fspath(adapter)}
    if "merged" in collected:

        def save_merged_model(tmp: str) -> None:
            save_merged(model, tmp, overwrite=True, state_dict=collected["merged"])
            tokenizer.save_pretrained(tmp)

        written["merged"] = write_dir(os.path.join(build, "merged"), save_merged_model)
    return written
