"""An unlearning run as steps over one :class:`RunState`: check → load → data → init → train → export.

:func:`check` finds everything that can be wrong before the weights load and anything is written.
Under ``torchrun`` every process runs this; the main one alone writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fastunlearn import data as fdata
from fastunlearn._io import write_json
from fastunlearn.data.examples import refusal_examples
from fastunlearn.engines import distributed
from fastunlearn.engines.base import Engine, engine_for
from fastunlearn.evaluation.evaluator import check as check_evaluations
from fastunlearn.evaluation.evaluator import evaluate, load_like
from fastunlearn.evaluation.sets import SetEvaluator
from fastunlearn.evaluation.stop_callback import StoppingCallback, measure_reference
from fastunlearn.evaluation.stopping import PLAN_OPTIONS, plan_stopping
from fastunlearn.fisher.budget import available_memory, format_bytes
from fastunlearn.methods import MethodSpec
from fastunlearn.methods.objectives import Objective, build_objective
from fastunlearn.methods.rmu import resolve_rmu_layers
from fastunlearn.models.devices import load_dtype, resolve_training_precision, training_device, weights_dtype
from fastunlearn.models.loading import keep_trainable_layout, load_model_and_tokenizer
from fastunlearn.models.patching import fused_blocker, patch, unpatch
from fastunlearn.options.unlearn import UnlearnConfig
from fastunlearn.plan.plan import MemoryPlan, plan_memory
from fastunlearn.training import outputs
from fastunlearn.training.adapters import (
    collect_outputs,
    initialise_adapters,
    reference_logprobs,
    save_outputs,
)
from fastunlearn.training.preflight import Checked, check_vocab, preflight, read_data
from fastunlearn.training.trainer import build_trainer


@dataclass
class UnlearnResult:
    """What a run produced: the trained model, its metrics, and the paths written."""

    model: nn.Module
    tokenizer: Any
    output_dir: str
    metrics: dict[str, Any]
    metrics_path: str
    run_config_path: str
    adapter_path: str | None = None
    model_path: str | None = None
    merged_path: str | None = None
    fisher_paths: dict[str, str] = field(default_factory=dict)


@dataclass
class RunState:
    """Everything a run knows, filled in step by step."""

    cfg: UnlearnConfig
    precision: str
    engine: Engine
    record: dict[str, Any]
    dirs: outputs.RunDirs
    checked: Checked
    stop_plan: Any
    suite: dict[str, dict[str, Any]]
    spec: MethodSpec
    idk: list[fdata.Example] | None = None  # each forget question with a refusal (IdK, DPO)
    model: Any = None
    tokenizer: Any = None
    dataset: fdata.PairedDataset | None = None
    sets: Any = None
    objective: Objective | None = None
    callbacks: list[Any] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    fisher_paths: dict[str, str] = field(default_factory=dict)
    fetching: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)


def check(cfg: UnlearnConfig) -> RunState:
    """Every check that can fail, before the weights load and before anything is written."""
    cfg.require()
    cfg = outputs.pin_revision(cfg)  # a Hub model id: the commit it resolves to now, for the whole run
    weights = None if isinstance(cfg.model, (str, os.PathLike)) else weights_dtype(cfg.model)
    precision = resolve_training_precision(cfg.precision, training_device(), init=cfg.init, weights=weights)
    distributed.init_from_env()  # under torchrun / accelerate launch: join the ranks' process group
    engine = engine_for(
        cfg.fsdp, cfg.deepspeed, init=cfg.init, resume=cfg.resume, cfg=cfg, precision=precision
    )
    data = distributed.on_all(lambda: read_data(cfg))
    formats = {n: fmt for n, (_, fmt) in data.items()} | ({"muse": "muse"} if cfg.muse is not None else {})
    stop_plan = distributed.on_all(
        lambda: plan_stopping(**{name: getattr(cfg, name) for name in PLAN_OPTIONS}, data=formats)
    )
    suite = distributed.on_all(lambda: _suite(cfg))
    record = outputs.run_record(cfg, precision=precision, engine=engine.name)
    dirs = distributed.on_main(lambda: _plan_output(cfg, record))
    checked = distributed.on_all(lambda: preflight(cfg, data))
    spec = cfg.method_spec()
    idk = distributed.on_all(lambda: _check_method(cfg, spec, checked, data["forget"], engine))
    if cfg.memory_check:  # the main process decides; its refusal is every rank's
        distributed.on_main(lambda: check_run_memory(cfg, checked, precision, engine.name))
    return RunState(cfg, precision, engine, record, dirs, checked, stop_plan, suite, spec, idk)


def _check_method(
    cfg: UnlearnConfig, spec: MethodSpec, checked: Checked, forget: tuple[list, str], engine: Engine
) -> list[fdata.Example] | None:
    """What the method needs beyond its options: a reference copy the engine allows, RMU's layers within
    the model's, the refusal answers (IdK, DPO) tokenised."""
    if spec.step_reference and cfg.init == "full" and engine.name == "zero3":
        raise ValueError(
            f"the {spec.retain!r} retain term with init='full' needs a frozen copy of the model as its "
            "reference, which DeepSpeed ZeRO-3's partitioned weights do not allow; use init='lora' or 'fila'"
        )
    if spec.uses_rmu and checked.config is not None:
        resolve_rmu_layers(checked.config, cfg.rmu_layer, cfg.rmu_train_layers)
    if not spec.uses_refusals:
        return None
    records, fmt = forget
    return refusal_examples(
        records, fmt, checked.tokenizer, path=cfg.idk, seed=cfg.seed, template=cfg.template,
        max_length=cfg.max_length,
    )  # fmt: skip


def check_run_memory(cfg: UnlearnConfig, checked: Checked, precision: str, engine: str) -> MemoryPlan | None:
    """``ValueError`` (a line, then the plan's table) if the plan's peak exceeds what the device has;
    the plan, or ``None`` with a warning when there is none. The plan: the run's options, precision and
    engine, every example as long as the longest (batches are padded), ``fisher_memory=None`` as one
    layer's accumulators. Available: :func:`available_memory`, plus a model module's bytes already on
    the device (the plan counts them too)."""
    device = training_device()
    module = cfg.model if isinstance(cfg.model, nn.Module) else None
    tokens = max((len(e.input_ids) for e in checked.forget + checked.retain), default=2)
    try:
        plan = plan_memory(
            cfg, config=checked.config, tokens=tokens, device=device.type, precision=precision,
            dtype=weights_dtype(module) if module is not None else None, world_size=distributed.world_size(),
            engine=engine,
        )  # fmt: skip
    except Exception as err:  # the plan advises; a model it cannot run still runs
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        warnings.warn(f"memory check skipped: no memory plan for this model ({reason})", stacklevel=2)
        return None
    available = available_memory(device)
    if module is not None:  # its parameters already on the device, which the plan counts too
        available += sum(
            p.numel() * p.element_size() for p in module.parameters() if p.device.type == device.type
        )
    if plan.peak_bytes > available:
        remedies = "lower batch_size, max_length or lora_r"
        if not cfg.gradient_checkpointing:
            remedies += ", use gradient_checkpointing"
        raise ValueError(
            f"the run does not fit the device ({device}): phase {plan.peak_phase.name!r} is predicted to "
            f"take {format_bytes(plan.peak_bytes)} ({plan.peak_bytes} bytes) but {format_bytes(available)} "
            f"({available} bytes) is available; {remedies}, or pass memory_check=False to run anyway "
            "(the plan is an estimate)\n" + plan.format_table()
        )
    return plan


def _plan_output(cfg: UnlearnConfig, record: dict[str, Any]) -> outputs.RunDirs:
    dirs = outputs.plan_run(cfg.output_dir, overwrite=cfg.overwrite, resume=cfg.resume)
    if dirs.resume:
        outputs.check_resumable(dirs.build, record, UnlearnConfig)
    return dirs


def load(run: RunState) -> None:
    """The model and tokenizer, patched (the losses inside its forward) and on their device."""
    cfg = run.cfg
    with run.engine.loading():
        run.model, run.tokenizer = load_model_and_tokenizer(
            cfg.model, run.checked.tokenizer, **cfg.loading_options(),
            dtype=load_dtype(run.precision, cfg.init),
        )  # fmt: skip
    keep_trainable_layout(run.model)  # a 4-bit model given as an object too
    if cfg.fused and (reason := fused_blocker(run.model)) is not None:
        raise ValueError(
            f"fused=True: cannot compute the losses of {type(run.model).__name__} fused: {reason}"
        )
    # Patched now, so that every pass of the run (evaluation, Fisher, training) takes the same path.
    patch(run.model, fused=cfg.fused, backend=cfg.ihl_backend, validate=False)
    run.engine.place(run.model)


def prepare_data(run: RunState) -> None:
    """The paired data set, the metrics before training, the stopping callback (its reference measured
    on the model before unlearning), then the output directory started."""
    cfg, checked = run.cfg, run.checked
    unseen = _prepare_unseen(cfg, checked.tokenizer) if run.stop_plan is not None else []
    check_vocab(run.model, unseen, "unseen")
    check_vocab(run.model, run.idk or [], "idk")
    run.dataset = fdata.PairedDataset(checked.forget, checked.retain, seed=cfg.seed, idk=run.idk)
    run.fetching.enter_context(run.engine.before_training(run.model))
    run.sets = SetEvaluator(
        run.tokenizer, checked.forget, checked.retain, eval_items=None, batch_size=cfg.eval_batch_size
    )
    if cfg.evaluate:
        run.metrics["before"] = _evaluate(run, {})
    if run.stop_plan is not None:
        run.callbacks.append(_stopping_callback(run, unseen))
    # The output directory is touched only now: a run refused above leaves it as it was.
    config_path = os.path.join(run.dirs.build, outputs.CONFIG)
    distributed.on_main(lambda: (outputs.start_run(run.dirs), write_json(config_path, run.record)))


def initialise(run: RunState) -> None:
    """LoRA, FILA or full fine-tuning; then the objective, whose reference is the model before
    unlearning (log-probabilities taken now, the model with its initial adapters, or a frozen copy)."""
    cfg, spec = run.cfg, run.spec
    run.model, run.fisher_paths = initialise_adapters(
        run.model, cfg, run.checked, run.dataset, run.dirs.build, run.engine
    )
    if spec.fixed_reference:
        parts = {"forget": run.checked.forget, "idk": run.idk}
        parts = {name: parts[name] for name in spec.fixed_reference}
        run.dataset.ref_logp = reference_logprobs(run.model, parts, cfg, run.precision, run.checked.pad_id)
    run.objective = build_objective(
        spec, run.model, init=cfg.init, precision=run.precision, rmu_layer=cfg.rmu_layer,
        rmu_steering=cfg.rmu_steering, seed=cfg.seed,
    )  # fmt: skip
    run.fetching.close()  # Trainer's DeepSpeed engine installs its own hooks


def train(run: RunState) -> None:
    """``Trainer`` over the paired batches; a resumed run goes on from its last checkpoint."""
    cfg = run.cfg
    wrapped = run.engine.wrap(run.model, run.precision)
    trainer = build_trainer(
        run.model, run.dataset, run.checked.pad_id, objective=run.objective, cfg=cfg,
        output_dir=run.dirs.build, precision=run.precision, extra_callbacks=run.callbacks,
        wrapped_model=wrapped, trajectory=run.callbacks[0].trajectory if run.callbacks else None,
        **run.engine.trainer_options(),
    )  # fmt: skip
    checkpoint = outputs.last_checkpoint(run.dirs.build) if run.dirs.resume else None
    if checkpoint is not None:
        trainer.resume_run_loss(checkpoint)
    if checkpoint is not None and run.callbacks:  # the evaluations up to it are not repeated
        run.callbacks[0].resume_from(checkpoint)
    start = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=checkpoint)
    run.metrics["train"] = {
        "loss": trainer.run_loss(),  # over every step of the run, a resumed one's included
        "global_step": out.global_step,
        "runtime_s": time.perf_counter() - start,
    }
    if run.callbacks:  # the callback has put the kept state back: "after" and the files are that state
        stopping = run.metrics["stopping"] = dict(run.callbacks[0].summary)
        for key in ("trajectory_csv", "trajectory_png"):  # where they are once the run is published
            if stopping.get(key):
                stopping[key] = os.path.join(run.dirs.output, os.path.basename(stopping[key]))
    if cfg.evaluate or run.suite:
        run.metrics["after"] = _evaluate(run, run.suite)


def export(run: RunState) -> UnlearnResult:
    """The adapter (or model) and merged model written, ``metrics.json`` last: the run is finished."""
    cfg, dirs = run.cfg, run.dirs
    gathered = run.engine.gathered_state(run.model, trainable_only=not cfg.merge)
    exported = collect_outputs(run.model, init=cfg.init, merge=cfg.merge, state_dict=gathered)

    def publish() -> dict[str, str]:
        written = save_outputs(run.model, run.tokenizer, exported, dirs.build, init=cfg.init)
        write_json(os.path.join(dirs.build, outputs.COMPLETE_MARKER), run.metrics)
        outputs.finish_run(dirs)
        return written

    written = distributed.on_main(publish)  # the other ranks wait until the run is published

    def published(path: str | None) -> str | None:
        return None if path is None else os.path.join(dirs.output, os.path.relpath(path, dirs.build))

    return UnlearnResult(
        model=run.model, tokenizer=run.tokenizer, output_dir=dirs.output, metrics=run.metrics,
        metrics_path=os.path.join(dirs.output, outputs.COMPLETE_MARKER),
        run_config_path=os.path.join(dirs.output, outputs.CONFIG),
        adapter_path=published(written.get("adapter")), model_path=published(written.get("model")),
        merged_path=published(written.get("merged")),
        fisher_paths={name: published(path) for name, path in run.fisher_paths.items()},
    )  # fmt: skip


def run_unlearning(cfg: UnlearnConfig) -> UnlearnResult:
    """Run the unlearning job ``cfg`` describes (module docstring)."""
    run = check(cfg)
    load(run)
    try:
        prepare_data(run)
        initialise(run)
        train(run)
        return export(run)
    finally:
        run.fetching.close()
        unpatch(run.model)


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
    """Unlearn ``forget`` from ``model`` while keeping it good on ``retain`` (Cha et al., ICLR 2025).

    ``model``: a causal LM (modified in place: wrapped with LoRA; for FILA its base weights become
    ``W − s·B₀A₀``), a local directory or a Hub id. ``forget`` / ``retain``: data files, ``datasets``
    folders, Hub data sets or records. ``options``: the fields of :class:`UnlearnConfig`.
    """
    names = [f.name for f in dataclasses.fields(UnlearnConfig)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        hints = [
            f"{n!r}: did you mean {c[0]!r}?" for n in unknown if (c := difflib.get_close_matches(n, names, 1))
        ]
        raise TypeError(f"unknown option(s) {unknown}" + (f" ({'; '.join(hints)})" if hints else ""))
    cfg = UnlearnConfig(
        model=model, tokenizer=tokenizer, forget=forget, retain=retain, method=method, init=init,
        output_dir=output_dir, **options,
    )  # fmt: skip
    return run_unlearning(cfg)


def _suite(cfg: UnlearnConfig) -> dict[str, dict[str, Any]]:
    """The field's evaluations to run after training, their inputs read and checked now."""
    suite = cfg.suite_requests(cfg.eval_batch_size, retrain_elsewhere=cfg.stop == "muse")
    if suite:
        check_evaluations(**suite)
    return suite


def _evaluate(run: RunState, suite: Mapping[str, Any]) -> dict[str, Any]:
    """The forget / retain metrics (unless ``--no-eval``) and ``suite``'s evaluations."""
    sets = {"sets": {"evaluator": run.sets}} if run.cfg.evaluate else {}
    access = dict(trust_remote_code=run.cfg.trust_remote_code, allow_download=run.cfg.allow_download)
    results = evaluate(run.model, run.tokenizer, **access, **sets, **suite)
    return {**results.pop("sets", {}), **results}


def _prepare_unseen(cfg: UnlearnConfig, tokenizer: Any) -> list[fdata.Example]:
    """The extraction rule's unseen text (a ``{"text"}`` file or a list of texts) as examples."""
    if cfg.unseen is None:
        return []
    data = cfg.unseen if isinstance(cfg.unseen, (str, os.PathLike)) else [{"text": t} for t in cfg.unseen]
    return fdata.prepare(
        data, tokenizer, name="unseen", data_format="text", max_length=cfg.max_length,
        allow_download=cfg.allow_download,
    )  # fmt: skip


def _stopping_callback(run: RunState, unseen: list[fdata.Example]) -> StoppingCallback:
    """The run's evaluating, stopping callback; call it with the model before LoRA / FILA."""
    controller, cfg, model, tokenizer = run.stop_plan, run.cfg, run.model, run.tokenizer
    muse = {"muse_dir": cfg.muse, "max_items": cfg.eval_items, "batch_size": cfg.eval_batch_size}
    evaluator = SetEvaluator(
        tokenizer, run.checked.forget, run.checked.retain or None, unseen or None, eval_items=cfg.eval_items,
        batch_size=cfg.eval_batch_size, max_new_tokens=cfg.eval_max_new_tokens,
        muse=None if cfg.muse is None else muse,
    )  # fmt: skip
    rule = controller.rule
    if rule is not None and not rule.resolved and rule.spec.source == "model":
        rule = measure_reference(rule, evaluator, model)
    elif rule is not None and not rule.resolved:
        access = dict(trust_remote_code=cfg.trust_remote_code, allow_download=cfg.allow_download)
        reference = load_like(rule.input, model, tokenizer, **access)
        rule = measure_reference(rule, evaluator, reference)
        del reference
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    controller.rule = rule
    return StoppingCallback(controller, evaluator, output_dir=run.dirs.build)
