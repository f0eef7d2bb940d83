"""The LoRA unlearning loop on ``transformers.Trainer`` and the :func:`unlearn` entry point.

:class:`UnlearnTrainer` is a ``Trainer`` whose batches are paired forget/retain batches
(:mod:`fastunlearn.data`) and whose loss is the chosen objective (:mod:`fastunlearn.methods`); mixed
precision, gradient accumulation, checkpoints, resume, logging and multi-GPU come from ``Trainer``.

:func:`unlearn` runs the paper's recipe (Cha et al. 2025 §4; SPEC §3.2): LoRA r = 32, alpha = 64,
dropout 0 on every linear layer but the output head; AdamW with weight decay 0.01; one epoch of linear
warm-up then linear decay; ``init="fila"`` estimates the forget and retain Fisher information and
re-initialises the adapters with :func:`fastunlearn.fila.fila_init`. It writes, atomically::

    output_dir/
      adapter/            peft adapter that loads on the ORIGINAL base model (LoRA / FILA)
      model/              the trained model (init="full")
      merged/             the merged model (merge=True)
      fisher/             forget.safetensors, retain.safetensors (FILA; reused on resume)
      checkpoints/        Trainer checkpoints (resume=True continues from the last one)
      metrics.json        {"before": {"forget", "retain"}, "after": {...}, "train": {...}}
      run_config.json     every option, the data and model sources, library versions
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from fastunlearn import data as fdata
from fastunlearn._backend import BACKENDS
from fastunlearn._io import write_dir, write_json
from fastunlearn.fila import SOLVERS
from fastunlearn.fisher import MODES
from fastunlearn.methods import METHODS, NEEDS_RETAIN, method_loss, sequence_logprobs

INITS = ("fila", "lora", "full")
# Entries unlearn() writes; overwrite=True removes these and nothing else from output_dir.
OUTPUT_ENTRIES = ("adapter", "model", "merged", "fisher", "checkpoints", "metrics.json", "run_config.json")
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
)

__all__ = [
    "INITS",
    "UnlearnConfig",
    "UnlearnResult",
    "UnlearnTrainer",
    "load_model_and_tokenizer",
    "to_training_device",
    "unlearn",
]


@dataclass
class UnlearnConfig:
    """Options of :func:`unlearn` (paper defaults where the paper has one)."""

    lora_r: int = 32
    lora_alpha: int = 64
    lora_dropout: float = 0.0
    target_modules: list[str] | None = None  # None: every nn.Linear but the output head
    learning_rate: float = 1e-4
    num_epochs: float = 5.0
    batch_size: int = 4
    gradient_accumulation_steps: int = 8  # effective batch 32, as the paper's
    warmup_epochs: float = 1.0
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    max_length: int = 512
    template: str = "plain"
    data_format: str = "auto"
    npo_beta: float = 0.1
    ihl_backend: str = "auto"
    # IHL from the last hidden states (fastunlearn.fused_linear_ihl_loss): the forget batch's [B, T, V]
    # logits never exist. For models whose logits are exactly lm_head(decoder(x)).
    fused_linear: bool = False
    fisher_mode: str = "per_example"
    fisher_batch_size: int = 4
    fila_eps: float = 1e-5
    fila_solver: str = "svd"
    seed: int = 0
    # bf16 autocast; a model given by path is also loaded in bf16 (a module object keeps its dtype)
    bf16: bool = False
    gradient_checkpointing: bool = False
    merge: bool = False
    overwrite: bool = False
    resume: bool = False
    evaluate: bool = True
    eval_batch_size: int = 16
    logging_steps: int = 10
    progress: bool = True
    trust_remote_code: bool = False
    allow_download: bool = False
    # transformers.TrainerCallback instances added to the Trainer (e.g. per-epoch evaluation and stopping,
    # fastunlearn.evaluation); recorded in run_config.json by class name.
    callbacks: list[Any] | None = None

    def __post_init__(self) -> None:
        positive = (
            "lora_r",
            "batch_size",
            "gradient_accumulation_steps",
            "max_length",
            "fisher_batch_size",
            "eval_batch_size",
            "logging_steps",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("learning_rate", "num_epochs", "npo_beta", "lora_alpha"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.warmup_epochs < 0 or self.weight_decay < 0 or not 0 <= self.lora_dropout < 1:
            raise ValueError("warmup_epochs and weight_decay must be >= 0 and lora_dropout in [0, 1)")
        if self.template not in fdata.TEMPLATE_NAMES:
            raise ValueError(
                f"unknown template {self.template!r}; expected one of {list(fdata.TEMPLATE_NAMES)}"
            )
        if self.data_format not in ("auto", *fdata.FORMATS):
            raise ValueError(
                f"unknown data format {self.data_format!r}; expected 'auto' or one of {list(fdata.FORMATS)}"
            )
        for name, allowed in (("fisher_mode", MODES), ("fila_solver", SOLVERS), ("ihl_backend", BACKENDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; expected one of {list(allowed)}")
        if self.overwrite and self.resume:
            raise ValueError("overwrite=True and resume=True exclude each other")


@dataclass
class UnlearnResult:
    """What :func:`unlearn` produced: the trained model, its metrics, and the paths written."""

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


class _EpochPairing(TrainerCallback):
    """Re-draw the forget/retain pairing at the start of each epoch (also after a resume mid-epoch)."""

    def __init__(self, dataset: fdata.PairedDataset) -> None:
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs) -> None:
        # state.epoch is e + (steps done)/(steps per epoch): its floor is the epoch index e.
        self.dataset.set_epoch(math.floor(state.epoch or 0))


class UnlearnTrainer(Trainer):
    """``Trainer`` on :class:`fastunlearn.data.PairedDataset` batches with an unlearning objective.

    ``compute_loss`` returns the per-micro-batch objective of :func:`fastunlearn.methods.method_loss`
    (token means within the batch, as the paper's code), so ``Trainer`` divides it by the number of
    accumulation steps. The forget and retain parts are averaged on-device between logging steps and
    logged as ``forget_loss`` and ``retain_loss``.
    """

    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args,
        method: str,
        npo_beta: float = 0.1,
        ihl_backend: str = "auto",
        fused_linear: bool = False,
        **kwargs,
    ):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {list(METHODS)}")
        super().__init__(*args, **kwargs)
        self.method, self.npo_beta, self.ihl_backend = method, npo_beta, ihl_backend
        self.fused_linear = fused_linear
        self._parts: dict[str, torch.Tensor] = {}
        self._parts_n = 0
        if isinstance(self.train_dataset, fdata.PairedDataset):
            self.add_callback(_EpochPairing(self.train_dataset))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, parts = method_loss(
            model,
            inputs,
            self.method,
            npo_beta=self.npo_beta,
            ihl_backend=self.ihl_backend,
            fused_linear=self.fused_linear,
        )
        for key, value in parts.items():
            self._parts[key] = self._parts.get(key, 0) + value
        self._parts_n += 1
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._parts_n:
            for key, value in self._parts.items():
                logs[key] = round(float(value) / self._parts_n, 4)  # one sync per logging step
            self._parts, self._parts_n = {}, 0
        super().log(logs, *args, **kwargs)


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


def load_model_and_tokenizer(
    model: nn.Module | str | os.PathLike,
    tokenizer: Any = None,
    *,
    trust_remote_code: bool = False,
    allow_download: bool = False,
    dtype: torch.dtype | str | None = None,
) -> tuple[nn.Module, Any]:
    """A causal LM and its tokenizer from objects or local paths (Hub ids only with ``allow_download``).

    Raises ``FileNotFoundError`` with a clear message when a path is not a local directory and
    downloads are not allowed, and ``TypeError`` for a model object without a tokenizer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def local(name: str, what: str) -> str:
        if not allow_download and not os.path.isdir(name):
            raise FileNotFoundError(
                f"{what} {name!r} is not a local directory. fastunlearn loads local models only; "
                "pass allow_download=True (--allow-download) to fetch it from the Hugging Face Hub"
            )
        return name

    source = None
    if isinstance(model, (str, os.PathLike)):
        source = local(os.fspath(model), "model")
        model = AutoModelForCausalLM.from_pretrained(
            source,
            local_files_only=not allow_download,
            trust_remote_code=trust_remote_code,
            dtype=dtype if dtype is not None else "auto",
        )
    elif not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module or a local path, got {type(model).__name__}")
    if tokenizer is None:
        if source is None:
            raise TypeError("pass the tokenizer with a model object (it can only be found from a model path)")
        tokenizer = source
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(
            local(os.fspath(tokenizer), "tokenizer"),
            local_files_only=not allow_download,
            trust_remote_code=trust_remote_code,
        )
    return model, tokenizer


def to_training_device(model: nn.Module) -> None:
    """Move a CPU model to the GPU ``Trainer`` will use, so evaluation, Fisher and NPO's reference run there.

    Models dispatched with a ``device_map`` and runs without CUDA are left where they are.
    """
    on_cpu = next(model.parameters()).device.type == "cpu"
    if torch.cuda.is_available() and on_cpu and getattr(model, "hf_device_map", None) is None:
        model.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))))


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
    from fastunlearn.fila import fila_init
    from fastunlearn.fisher import FisherEstimate, estimate_fisher

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


def _describe(data: Any) -> str:
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
    from fastunlearn.metrics import basic_metrics

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
    ``retain``: JSON Lines paths or iterables of records (see :mod:`fastunlearn.data`); ``retain`` may be
    ``None`` only for ``method="ga"``. ``method``: ``"ihl"``, ``"ga"``, ``"gd"``, ``"npo"``
    (:mod:`fastunlearn.methods`). ``init``: ``"fila"``, ``"lora"`` or ``"full"``. ``options``: the
    fields of :class:`UnlearnConfig` (unknown names raise ``TypeError``).
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

    run_config = {
        "method": method,
        "init": init,
        "options": _options_record(cfg),
        "model": _describe(model)
        if isinstance(model, (str, os.PathLike))
        else getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__,
        "forget": _describe(forget),
        "retain": None if retain is None else _describe(retain),
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
    prep = dict(data_format=cfg.data_format, template=cfg.template, max_length=cfg.max_length)
    forget_ex = fdata.prepare(forget, tokenizer, name="forget", **prep)
    retain_ex = [] if retain is None else fdata.prepare(retain, tokenizer, name="retain", **prep)
    for name, examples in (("forget", forget_ex), ("retain", retain_ex)):
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

    trainer = build_trainer(model, dataset, pad_id, method=method, cfg=cfg, output_dir=output_dir)
    start = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=_last_checkpoint(output_dir) if cfg.resume else None)
    metrics["train"] = {
        "loss": out.training_loss,
        "global_step": out.global_step,
        "runtime_s": time.perf_counter() - start,
    }
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


def build_trainer(
    model: nn.Module,
    dataset: fdata.PairedDataset,
    pad_id: int,
    *,
    method: str,
    cfg: UnlearnConfig,
    output_dir: str,
):
    """An :class:`UnlearnTrainer` with the paper's schedule: linear warm-up, then linear decay."""
    batches_per_epoch = math.ceil(len(dataset) / cfg.batch_size)
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / cfg.gradient_accumulation_steps))
    args = TrainingArguments(
        output_dir=os.path.join(output_dir, "checkpoints"),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_train_epochs=cfg.num_epochs,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        lr_scheduler_type="linear",
        warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
        optim="adamw_torch",
        bf16=cfg.bf16,
        logging_steps=cfg.logging_steps,
        save_strategy="epoch",
        save_total_limit=1,
        report_to="none",
        seed=cfg.seed,
        remove_unused_columns=False,
        disable_tqdm=not cfg.progress,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    return UnlearnTrainer(
        model=model,
        args=args,
        callbacks=cfg.callbacks,
        train_dataset=dataset,
        data_collator=fdata.PairCollator(pad_id),
        method=method,
        npo_beta=cfg.npo_beta,
        ihl_backend=cfg.ihl_backend,
        fused_linear=cfg.fused_linear,
    )


def _save_outputs(result: UnlearnResult, *, init: str, merge: bool) -> None:
    model, out = result.model, result.output_dir
    if init == "full":

        def save_full(tmp: str) -> None:
            model.save_pretrained(tmp)
            result.tokenizer.save_pretrained(tmp)

        result.model_path = write_dir(os.path.join(out, "model"), save_full)
        return
    from fastunlearn.fila import save_adapter, save_merged

    result.adapter_path = os.fspath(save_adapter(model, os.path.join(out, "adapter"), overwrite=True))
    if merge:

        def save_merged_model(tmp: str) -> None:
            save_merged(model, tmp, overwrite=True)
            result.tokenizer.save_pretrained(tmp)

        result.merged_path = write_dir(os.path.join(out, "merged"), save_merged_model)
