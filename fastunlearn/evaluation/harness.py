"""Downstream tasks through EleutherAI's lm-evaluation-harness (Gao et al., ``lm-eval``) on the model in
memory: WMDP (Li et al. 2024, arXiv:2403.03218; ``wmdp_bio``, ``wmdp_cyber``, ``wmdp_chem``), MMLU and
the classification tasks the extraction protocol reports after unlearning (HellaSwag, LAMBADA,
Winogrande, COPA, ARC, PIQA, MathQA, PubMedQA).

The model is handed to the harness as it is — adapters applied, patched or not, in its dtype and on
its device — through ``HFLM(pretrained=model)``: nothing is merged, saved or reloaded, so the numbers
are those of the model being unlearned. Local YAML tasks are found with
``TaskManager(include_path=...)``; a task whose YAML reads a local file (``dataset_path: json``,
``dataset_kwargs: {data_files: ...}``) runs offline. The harness's own tasks fetch their data from
the Hugging Face Hub (or its cache) the first time.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fastunlearn.engines import distributed
from fastunlearn.evaluation.likelihood import eval_mode

__all__ = ["check_tasks", "evaluate_lm_eval"]

_INSTALL = 'pip install "fastunlearn[eval]"'
# What simple_evaluate returns beside the scores that is not kept: the per-document records.
_DROPPED = ("samples",)


def _json_part(value: Any) -> Any:
    """``value`` with every leaf JSON can encode kept and every other one (a dtype, a device) written as
    its ``str``; dict keys as strings."""
    if isinstance(value, Mapping):
        return {str(k): _json_part(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_part(v) for v in value]
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return str(value)
    return value


def _task_list(tasks: str | Sequence[str]) -> list[str]:
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [t.strip() for t in names if t.strip()]
    if not names:
        raise ValueError("no lm-eval task given")
    return names


def _harness():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError(f"lm-evaluation-harness is not installed ({err}): {_INSTALL}") from None
    return lm_eval, HFLM, TaskManager


@functools.cache
def _task_manager(paths: tuple[str, ...], include_defaults: bool) -> Any:
    """The harness's task index (seconds to build with its own tasks), built once per process."""
    _, _, TaskManager = _harness()
    return TaskManager(include_path=list(paths) or None, include_defaults=include_defaults)


def check_tasks(
    tasks: str | Sequence[str],
    *,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    include_defaults: bool = True,
) -> tuple[list[str], Any]:
    """The task names and the task manager that knows them: ``ImportError`` naming the extra to install
    without ``lm-eval``, ``ValueError`` naming every task neither the harness nor ``include_path`` has.
    Tasks all found in ``include_path`` are run from an index of it alone (the harness's own thousands
    of task files take seconds to index)."""
    _harness()
    names = _task_list(tasks)
    paths = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path or [])
    paths = tuple(os.fspath(p) for p in paths)
    for defaults in dict.fromkeys((False, include_defaults) if paths else (include_defaults,)):
        manager = _task_manager(paths, defaults)
        unknown = [t for t in names if t not in set(manager.all_tasks) and not os.path.isfile(t)]
        if not unknown:
            return names, manager
    raise ValueError(
        f"unknown lm-eval task(s) {unknown}" + (f" (include_path: {list(paths)})" if paths else "")
    )


def evaluate_lm_eval(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: str | Sequence[str],
    *,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    include_defaults: bool = True,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` of ``model`` (module docstring) on ``tasks`` (names, or a
    comma-separated string; groups and tags such as ``mmlu`` included).

    ``include_path``: directories (or one) of local YAML tasks; ``include_defaults=False`` indexes only
    those (the harness's own ~15k task files take seconds to index). ``limit``: documents per task (a
    fraction below 1 is a share); ``num_fewshot``: in-context examples (the tasks' own by default);
    ``max_length``: the context the harness fits requests into (the model's by default). Returns the
    JSON-serialisable part of what ``simple_evaluate`` returns — ``results``, ``versions``, ``n-shot``,
    ``configs``, ``config`` and the rest — without the per-document ``samples``. Raises
    ``ValueError`` naming any task the harness does not know, and ``ImportError`` naming the extra to
    install when ``lm-eval`` is missing. The model's train/eval mode is restored afterwards.

    Under several processes the main process evaluates and every rank gets its results; when the
    weights are split between the ranks (FSDP, ZeRO-3) every rank runs the same requests, in step.
    """
    lm_eval, HFLM, _ = _harness()
    names, manager = check_tasks(tasks, include_path=include_path, include_defaults=include_defaults)

    def run() -> dict[str, Any] | None:
        with eval_mode(model):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
            out = lm_eval.simple_evaluate(
                model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                log_samples=False,
            )  # fmt: skip
        return None if out is None else _json_part({k: v for k, v in out.items() if k not in _DROPPED})

    if distributed.parameters_sharded(model):
        return distributed.broadcast_object(run())
    return distributed.on_main(run)
