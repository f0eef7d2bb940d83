"""Downstream tasks through EleutherAI's lm-evaluation-harness (``lm-eval``): WMDP (Li et al. 2024,
arXiv:2403.03218), MMLU and the tasks the extraction protocol reports after unlearning (Jang et al.
2023). The model is handed over as it is (``HFLM(pretrained=model)``: adapters applied, nothing merged
or reloaded); local YAML tasks come from ``include_path``.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import torch

from fastunlearn.engines import distributed
from fastunlearn.evaluation.likelihood import eval_mode

_INSTALL = 'pip install "fastunlearn[eval]"'


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
    """The task names and the task manager that knows them (an index of ``include_path`` alone when it
    has every task: the harness's own take seconds to index); ``ValueError`` naming unknown tasks."""
    _harness()
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise ValueError("no lm-eval task given")
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
    """``lm_eval.simple_evaluate`` of ``model`` on ``tasks`` (names or a comma-separated string), without
    the per-document ``samples``, JSON-serialisable. ``limit``: documents per task (below 1 a share).
    Under several processes the main process evaluates and every rank gets the results.
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
        if out is None:
            return None
        # Without the per-document records; what JSON cannot encode (a dtype, a device) as its str.
        return json.loads(json.dumps({k: v for k, v in out.items() if k != "samples"}, default=str))

    if distributed.parameters_sharded(model):
        return distributed.broadcast_object(run())
    return distributed.on_main(run)
