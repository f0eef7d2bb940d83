"""The demo: the whole unlearning job, offline, on a laptop CPU in a few minutes (``fastunlearn demo``).

1. :mod:`~fastunlearn.demo.data`: a deterministic synthetic data set in TOFU's format (Maini et al.
   2024; SPEC §4): fictitious authors with facts (birthplace, birth date, genre, parents' jobs, award,
   book), one question/answer pair per fact, each with a paraphrased question and answer and five
   perturbed (wrong) answers. 10 % of the authors form the forget set.
2. :mod:`~fastunlearn.demo.models`: a byte-level BPE tokenizer trained on it with ``tokenizers``, a
   small Llama-architecture model trained until it has memorised every answer, and a second model
   trained on the retain authors only (the reference for forget quality). Both are cached, so a second
   run skips this step.
3. :mod:`~fastunlearn.demo.run`: :func:`fastunlearn.unlearn` on the forget set with the chosen method
   and initialisation, then a before/after table of the forget and retain metrics and of TOFU's forget
   quality (against the retain-only model's forget-set truth ratios, computed once and cached) and
   model utility.

The command itself is :mod:`fastunlearn.cli.demo`.
"""

from fastunlearn.demo.data import generate_dataset, write_jsonl
from fastunlearn.demo.models import (
    DEMO_MAX_LENGTH,
    DEMO_TEMPLATE,
    SIZES,
    DemoSize,
    build_model,
    default_cache_dir,
    memorise,
    prepare_models,
    train_tokenizer,
)
from fastunlearn.demo.run import run_demo

__all__ = [
    "DEMO_MAX_LENGTH",
    "DEMO_TEMPLATE",
    "SIZES",
    "DemoSize",
    "build_model",
    "default_cache_dir",
    "generate_dataset",
    "memorise",
    "prepare_models",
    "run_demo",
    "train_tokenizer",
    "write_jsonl",
]
