"""DeepSpeed ZeRO as the training engine (``deepspeed=CONFIG``): what must happen around ``Trainer``.

The config is checked before any weight loads (every value contradicting an option in one ``ValueError``;
``"auto"`` filled as ``Trainer`` fills it). Under ZeRO-3 the model is created partitioned and the passes
before training fetch its weights through a DeepSpeed engine of their own; ZeRO-1/2 load it whole.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

from torch import nn

from fastunlearn.engines.base import Engine
from fastunlearn.models.loading import read_json_object

_AUTO = "auto"


def load_deepspeed_config(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """A DeepSpeed config from a JSON file or a mapping (deep-copied), or a one-line ``ValueError``."""
    if isinstance(source, Mapping):
        return copy.deepcopy(dict(source))
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"deepspeed must be a JSON file path or a dict, got {type(source).__name__}")
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise ValueError(f"deepspeed config {path!r} is not a file")
    return read_json_object(path)


def _node(config: Mapping[str, Any], dotted: str) -> tuple[dict[str, Any] | None, str]:
    """The dict holding ``dotted``'s last key (``None`` if a parent is missing), and that key."""
    *parents, key = dotted.split(".")
    node: Any = config
    for part in parents:
        node = node.get(part) if isinstance(node, Mapping) else None
        if node is None:
            return None, key
    return (node if isinstance(node, dict) else None), key


def zero_stage(config: Mapping[str, Any]) -> int:
    """The config's ZeRO stage (0 without a ``zero_optimization`` section); ``ValueError`` if not 0–3."""
    section = config.get("zero_optimization", {})
    if not isinstance(section, Mapping):
        raise ValueError("deepspeed config: zero_optimization must be an object")
    stage = section.get("stage", 0)
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        raise ValueError(f"deepspeed config: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return stage


def check_deepspeed_config(
    config: Mapping[str, Any], cfg: Any, precision: str, world_size: int
) -> dict[str, Any]:
    """``config`` with its ``"auto"`` values for the options filled in, or a ``ValueError`` listing
    every value that contradicts them. ``precision``: the resolved one."""
    resolved = copy.deepcopy(dict(config))
    zero_stage(resolved)
    batch, accum = cfg.batch_size, cfg.gradient_accumulation_steps
    # (config entry, the value the options give, the options as the message names them: Python names
    # outside quotes, so that the command line shows its flags; config entries quoted, as in the JSON)
    expected: list[tuple[str, Any, str]] = [
        ("train_micro_batch_size_per_gpu", batch, f"batch_size={batch}"),
        ("gradient_accumulation_steps", accum, f"gradient_accumulation_steps={accum}"),
        (
            "train_batch_size",
            world_size * batch * accum,
            f"{world_size} process(es) × batch_size={batch} × gradient_accumulation_steps={accum}",
        ),
        ("gradient_clipping", cfg.max_grad_norm, f"max_grad_norm={cfg.max_grad_norm}"),
        ("optimizer.params.lr", cfg.learning_rate, f"learning_rate={cfg.learning_rate}"),
        ("optimizer.params.weight_decay", cfg.weight_decay, f"weight_decay={cfg.weight_decay}"),
        ("bf16.enabled", precision == "bf16", f"precision={precision}"),
        ("fp16.enabled", precision == "fp16", f"precision={precision}"),
    ]
    contradictions = []
    for dotted, want, option in expected:
        node, key = _node(resolved, dotted)
        if node is None or key not in node:
            continue
        if node[key] == _AUTO:
            node[key] = want
        elif node[key] != want or isinstance(node[key], bool) != isinstance(want, bool):
            contradictions.append(f'"{dotted}": {json.dumps(node[key])} contradicts {option}')
    if contradictions:
        raise ValueError(
            "the deepspeed config contradicts the options: "
            + "; ".join(contradictions)
            + ' (set these entries to "auto" or change the options)'
        )
    return resolved


def _inference_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """What a ZeRO-3 engine without optimizer needs of a training config: batch sizes, precision and
    ``zero_optimization`` (there under ZeRO-3), ``"auto"`` entries left to DeepSpeed's defaults."""
    keys = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "bf16", "fp16")
    kept = {key: config[key] for key in keys if key in config}
    for key in ("zero_optimization", "bf16", "fp16"):
        if isinstance(config.get(key), Mapping):
            kept[key] = {k: v for k, v in config[key].items() if v != _AUTO}
    return kept


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO through ``Trainer``, for a checked ``config`` (:func:`prepare_deepspeed`: the
    options' ``"auto"`` values filled, the rest are ``Trainer``'s to fill)."""

    def __init__(self, config: dict[str, Any], stage: int) -> None:
        self.config, self.stage = config, stage
        self.name = f"zero{stage}" if stage >= 2 else "ddp"
        self.keep_alive: Any = None  # the HfDeepSpeedConfig of loading(), until the run ends (ZeRO-3)
        self.engine: Any = None  # the DeepSpeed engine of before_training(), while it runs

    @contextlib.contextmanager
    def loading(self) -> Iterator[None]:
        """Under ZeRO-3, ``from_pretrained`` creates the model inside ``deepspeed.zero.Init``, each weight
        partitioned as it is read (``transformers`` keeps only a weak reference to the config)."""
        if self.stage == 3 and self.keep_alive is None:
            from transformers.integrations import HfDeepSpeedConfig

            self.keep_alive = HfDeepSpeedConfig(self.config)
        yield

    def place(self, model: nn.Module) -> None:
        if self.stage != 3:  # ZeRO-3 shards are already on this rank's device
            super().place(model)

    @contextlib.contextmanager
    def before_training(self, model: nn.Module) -> Iterator[None]:
        """Inside the block, passes of a ZeRO-3 ``model`` fetch its partitioned weights through a
        DeepSpeed engine without optimizer, whose hooks are removed on exit; no-op below ZeRO-3."""
        if self.stage != 3:
            yield
            return
        import deepspeed

        self.engine, *_ = deepspeed.initialize(model=model, config=_inference_config(self.config))
        try:
            yield
        finally:
            self.after_fisher()
            self.engine.destroy()  # removes its hooks: Trainer's engine installs its own
            self.engine = None

    def after_fisher(self) -> None:
        """Partition again the weights the passes before training left whole: a backward DeepSpeed does
        not drive (the Fisher passes') never fires the post-backward hooks below its first input, and
        FILA's gather for a write would fail on them."""
        if self.engine is None:
            return
        offload = self.engine.optimizer  # ZeRO-3 without optimizer: the hooks' owner, DeepSpeedZeRoOffload
        release = getattr(offload, "release_backward_leftovers", None)
        if release is None:
            import deepspeed

            raise RuntimeError(
                f"DeepSpeed {deepspeed.__version__} cannot release the weights a Fisher pass left gathered "
                "(no release_backward_leftovers); ZeRO-3 runs need deepspeed>=0.19"
            )
        release()

    def trainer_options(self) -> dict[str, Any]:
        return {"deepspeed": self.config}


def prepare_deepspeed(
    source: str | os.PathLike | Mapping[str, Any], cfg: Any, precision: str, world_size: int
) -> DeepSpeedEngine:
    """Read and check a run's DeepSpeed config before the model loads (``ValueError`` in one line)."""
    config = check_deepspeed_config(load_deepspeed_config(source), cfg, precision, world_size)
    stage = zero_stage(config)
    if importlib.util.find_spec("deepspeed") is None:
        raise ValueError('DeepSpeed is not installed: pip install "fastunlearn[deepspeed]"')
    return DeepSpeedEngine(config, stage)
