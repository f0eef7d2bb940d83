"""Everything about a run's model and data that can be wrong, checked before the weights load.

The data is read once and tokenised with the run's tokenizer; the model is built on the ``meta`` device
from its config (a module given as such is checked itself) to check token ids against the vocabulary,
lengths against the context, ``target_modules`` against its modules and, for FILA, ``r ≤ min(out, in)``
of every adapted weight (the solver takes ``r`` singular directions of each).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from fastunlearn import data as fdata
from fastunlearn.data.examples import tokenize_records
from fastunlearn.evaluation.muse import read_muse
from fastunlearn.fisher import select_linear_layers
from fastunlearn.fisher.budget import FILA_ACCUMULATORS, accumulator_bytes, parse_bytes, plan_groups
from fastunlearn.models.loading import load_config, model_skeleton, resolve_model
from fastunlearn.models.naming import canonical_name
from fastunlearn.options.unlearn import UnlearnConfig

Records = tuple[list[dict[str, Any]], str]  # a data set's records and its detected format


@dataclass
class Checked:
    """The tokenizer and its padding id, the tokenised forget and retain sets, and the model's config (or
    ``None``)."""

    tokenizer: Any
    forget: list[fdata.Example]
    retain: list[fdata.Example]
    config: Any
    pad_id: int


def read_data(cfg: UnlearnConfig) -> dict[str, Records]:
    """The records and format of ``forget`` and ``retain`` (unless ``None``), read once; a MUSE directory
    stands for those not given with its ``raw/forget`` and ``raw/retain1`` (Shi et al. 2024)."""
    forget, retain = cfg.forget, cfg.retain
    if cfg.muse is not None:
        forget = forget if forget is not None else read_muse(cfg.muse, "raw/forget")
        retain = retain if retain is not None else read_muse(cfg.muse, "raw/retain1")
    sets = {"forget": forget, **({"retain": retain} if retain is not None else {})}
    return {
        name: fdata.load_records(
            data, data_format=cfg.data_format, name=name, allow_download=cfg.allow_download
        )
        for name, data in sets.items()
    }


def check_vocab(model: nn.Module, examples: Iterable[fdata.Example], name: str) -> None:
    """Every token id of ``examples`` must be inside the model's input embedding."""
    vocab = model.get_input_embeddings().num_embeddings
    for e in examples:
        if max(e.input_ids) >= vocab:
            raise ValueError(
                f"{e.source}: token id {max(e.input_ids)} is outside the model's vocabulary ({vocab}); "
                f"the tokenizer does not match the model ({name} set)"
            )


_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def check_context(config: Any, examples: Iterable[fdata.Example]) -> None:
    """No example may be longer than the model's context."""
    context = next((v for k in _CONTEXT_FIELDS if isinstance(v := getattr(config, k, None), int)), None)
    longest = max(examples, key=lambda e: len(e.input_ids), default=None)
    if context is not None and longest is not None and len(longest.input_ids) > context:
        raise ValueError(
            f"{longest.source}: {len(longest.input_ids)} tokens, more than the model's context of {context} "
            f"positions; give max_length={context} or less to cut the examples"
        )


def check_target_modules(model: nn.Module, cfg: UnlearnConfig) -> None:
    """The adapters ``cfg.init`` would place on ``model`` exist and fit: FILA's layers (those the Fisher
    estimate covers) have ``r ≤ min(out, in)`` and their accumulators fit ``fisher_memory``; each LoRA
    entry names a leaf module (a full name or a dotted suffix, as peft matches)."""
    if cfg.init == "fila":
        layers = select_linear_layers(model, cfg.target_modules)
        small = {name: tuple(layer.weight.shape) for name, layer in layers.items()}
        small = {name: shape for name, shape in small.items() if cfg.lora_r > min(shape)}
        if small:
            name, shape = next(iter(small.items()))
            raise ValueError(
                f"lora_r={cfg.lora_r} exceeds min(out, in) = {min(shape)} of layer {name!r} (weight "
                f"{shape}) and {len(small) - 1} other layer(s); FILA needs r <= the smaller side of every "
                "adapted weight"
            )
        if cfg.fisher_memory is not None:  # refused now rather than after the weights load
            budget = parse_bytes(cfg.fisher_memory)
            plan_groups(accumulator_bytes(layers, 2), budget, what=FILA_ACCUMULATORS,
                        origin="the Fisher memory budget (fisher_memory)")  # fmt: skip
    elif cfg.init == "lora" and cfg.target_modules is not None:
        leaves = [canonical_name(n) for n, m in model.named_modules() if n and not any(m.children())]
        for spec in cfg.target_modules:
            key = canonical_name(spec)
            if not any(n == key or n.endswith("." + key) for n in leaves):
                kinds = sorted({n.rsplit(".", 1)[-1] for n in leaves})
                raise ValueError(
                    f"target_modules entry {spec!r} matches no module of the model; its modules are {kinds}"
                )


def on_meta(cfg: Any) -> tuple[Any, nn.Module, Any]:
    """The tokenizer, the model built on the ``meta`` device from its config (a module: itself) and the
    config, of a command's options ``cfg``."""
    access = dict(trust_remote_code=cfg.trust_remote_code, allow_download=cfg.allow_download)
    source, tokenizer = resolve_model(cfg.model, cfg.tokenizer, **access, revision=cfg.revision)
    if source is None:
        return tokenizer, cfg.model, getattr(cfg.model, "config", None)
    config = load_config(source.base or source.path, trust_remote_code=cfg.trust_remote_code)
    return tokenizer, model_skeleton(config, trust_remote_code=cfg.trust_remote_code), config


def preflight(cfg: UnlearnConfig, data: Mapping[str, Records]) -> Checked:
    """Check a run's model, tokenizer and ``data`` (from :func:`read_data`); raise the first problem."""
    tokenizer, skeleton, config = on_meta(cfg)
    examples = {
        name: tokenize_records(
            records, tokenizer, data_format=fmt, template=cfg.template, max_length=cfg.max_length
        )
        for name, (records, fmt) in data.items()
    }
    forget_ex, retain_ex = examples["forget"], examples.get("retain", [])
    for name, ex in (("forget", forget_ex), ("retain", retain_ex)):
        check_vocab(skeleton, ex, name)
    check_context(config, forget_ex + retain_ex)
    check_target_modules(skeleton, cfg)
    return Checked(tokenizer, forget_ex, retain_ex, config, fdata.pad_id_of(tokenizer))
