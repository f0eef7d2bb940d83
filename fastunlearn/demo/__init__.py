"""The demo: the whole unlearning job, offline, on a laptop CPU in a few minutes (``fastunlearn demo``).

Synthetic TOFU-format data, a tokenizer and small models that memorise it, cached (:mod:`.models`),
then :func:`fastunlearn.unlearn` and a before/after table (:mod:`.run`).
"""

from fastunlearn.demo.models import (
    DEMO_TEMPLATE,
    SIZES,
    build_model,
    default_cache_dir,
    generate_dataset,
    prepare_models,
    train_tokenizer,
    write_jsonl,
)
from fastunlearn.demo.run import run_demo

__all__ = [
    "DEMO_TEMPLATE",
    "SIZES",
    "build_model",
    "default_cache_dir",
    "generate_dataset",
    "prepare_models",
    "run_demo",
    "train_tokenizer",
    "write_jsonl",
]
