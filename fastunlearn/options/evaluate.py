"""The options of ``fastunlearn eval``: which evaluations run on a model, and how."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastunlearn.data import TEMPLATE_NAMES
from fastunlearn.options.common import ModelAccess, RunControl
from fastunlearn.options.schema import Validated, option

TOFU_MODES = ("full", "legacy")
_MIA, _PRIVLEAK = "membership inference", "PrivLeak (membership inference, MUSE)"


@dataclass
class EvalSuite:
    """The field's evaluations, for ``fastunlearn eval`` and after a run. Only ``muse`` and
    ``retrain_model`` are part of a run's identity; a resumed run may change the others."""

    mia_forget: Any = option(
        None, "the members: text records, every token a target", path=True, identity=False, group=_MIA
    )
    mia_holdout: Any = option(
        None, "the non-members: texts never trained on", path=True, identity=False, group=_MIA
    )
    mia_k: float = option(
        0.4, "Min-K%'s fraction of lowest-scoring tokens (and PrivLeak's)", positive=True, identity=False,
        group=_MIA,
    )  # fmt: skip
    mia_reference_model: Any = option(
        None, "a reference model, same tokenizer, for the reference attack", path=True, identity=False,
        group=_MIA,
    )  # fmt: skip
    muse: Any = option(
        None, "a MUSE benchmark directory (unlearn's default forget and retain sets)", path=True, group="MUSE"
    )
    retrain_model: Any = option(
        None, "the model retrained without the forget set (same tokenizer)", path=True, group=_PRIVLEAK
    )
    retrain_auc: float | None = option(
        None, "the retrained model's Min-K% AUC, instead of --retrain-model", positive=True,
        identity=False, group=_PRIVLEAK,
    )  # fmt: skip
    lm_eval: str | None = option(
        None, "lm-evaluation-harness tasks, e.g. wmdp_bio,mmlu", metavar="TASKS", identity=False,
        group="lm-eval",
    )  # fmt: skip
    lm_eval_include: Any = option(
        None, "a directory of local task YAML files", path=True, identity=False, group="lm-eval"
    )
    lm_eval_limit: int | None = option(
        None, "documents per task", positive=True, identity=False, group="lm-eval"
    )
    lm_eval_fewshot: int | None = option(
        None, "in-context examples (default: each task's own)", minimum=0, identity=False, group="lm-eval"
    )
    dialogue: Any = option(
        None, 'a file of {"context", "response"} records: unigram F1 of the greedy response', path=True,
        identity=False, group="dialogue",
    )  # fmt: skip

    def suite_requests(
        self, batch_size: int, *, retrain_elsewhere: bool = False
    ) -> dict[str, dict[str, Any]]:
        """The evaluations asked for, as :func:`fastunlearn.evaluate` takes them; an option nothing uses is
        an error (``retrain_elsewhere``: a stopping rule uses the retrained model)."""
        privleak = {"retrain_model": self.retrain_model, "retrain_auc": self.retrain_auc, "k": self.mia_k}
        out: dict[str, dict[str, Any]] = {}
        if self.mia_forget is not None or self.mia_holdout is not None:
            out["mia"] = dict(
                forget=self.mia_forget, holdout=self.mia_holdout, reference_model=self.mia_reference_model,
                batch_size=batch_size, **privleak,
            )  # fmt: skip
        if self.muse is not None:
            out["muse"] = dict(muse_dir=self.muse, batch_size=batch_size, **privleak)
        if self.lm_eval is not None:
            out["lm_eval"] = dict(
                tasks=self.lm_eval, include_path=self.lm_eval_include, limit=self.lm_eval_limit,
                num_fewshot=self.lm_eval_fewshot, batch_size=batch_size,
            )  # fmt: skip
        if self.dialogue is not None:
            out["dialogue"] = dict(data=self.dialogue, batch_size=batch_size)
        privleak_sets = ("--mia-forget/--mia-holdout or --muse", "mia", "muse")
        for flag, value, (needed, *names) in (
            ("--mia-reference-model", self.mia_reference_model, ("--mia-forget/--mia-holdout", "mia")),
            ("--retrain-model", None if retrain_elsewhere else self.retrain_model, privleak_sets),
            ("--retrain-auc", self.retrain_auc, privleak_sets),
            ("--lm-eval-include", self.lm_eval_include, ("--lm-eval TASKS", "lm_eval")),
            ("--lm-eval-limit", self.lm_eval_limit, ("--lm-eval TASKS", "lm_eval")),
            ("--lm-eval-fewshot", self.lm_eval_fewshot, ("--lm-eval TASKS", "lm_eval")),
        ):
            if value is not None and not set(names) & set(out):
                raise ValueError(f"{flag} is used with {needed}, and none is given")
        if self.retrain_auc is not None and {"mia", "muse"} <= set(out):
            raise ValueError(
                "--retrain-auc is the retrained model's AUC on one pair of sets: give it with --mia-forget/"
                "--mia-holdout or with --muse, not both (or give --retrain-model)"
            )
        return out


@dataclass
class EvalConfig(RunControl, EvalSuite, ModelAccess, Validated):
    """Every option of an evaluation."""

    base_model: Any = option(
        None, "base model of a peft adapter MODEL (default: the one it records)", path=True, group="model"
    )
    tofu: Any = option(None, "directory of TOFU-format JSON Lines files", path=True, group="TOFU")
    forget_split: str | None = option(None, "forget split to use from --tofu, e.g. forget10", group="TOFU")
    forget: Any = option(None, "TOFU-format file of the forget set", path=True, group="TOFU")
    retain: Any = option(None, "TOFU-format file of the retain set", path=True, group="TOFU")
    real_authors: Any = option(None, "TOFU-format file of the real-authors set", path=True, group="TOFU")
    world_facts: Any = option(None, "TOFU-format file of the world-facts set", path=True, group="TOFU")
    mode: str = option(
        "full", "legacy: TOFU's own pipeline, token for token", choices=TOFU_MODES, group="TOFU"
    )
    template: str | None = option(
        None, "prompt template the model was trained with (default: its run's)", choices=TEMPLATE_NAMES,
        group="TOFU",
    )  # fmt: skip
    reference_truth_ratios: Any = option(
        None, "the retain-only model's truth ratios (from --save-reference)", flag="--reference",
        path=True, group="TOFU",
    )  # fmt: skip
    save_reference: Any = option(
        None, "save this model's forget truth ratios (JSON)", path="output", group="TOFU"
    )
    max_items: int | None = option(
        None, "evaluate at most this many items per set", positive=True, group="TOFU"
    )
    max_new_tokens: int = option(200, "greedy answer length (full mode)", positive=True, group="TOFU")
    generate: bool = option(True, "generation (and ROUGE-L)", negate=True, group="TOFU")
    max_length: int | None = option(
        None, "token cap of a question + answer (default: the run's, else 512; legacy: 200)", positive=True,
        group="TOFU",
    )  # fmt: skip
    extraction: Any = option(None, 'data file of {"text"} sequences', path=True, group="extraction")
    n: int = option(10, "n-gram size of EL_n", positive=True, group="extraction")
    sequence_length: int = option(200, "tokens per sequence", positive=True, group="extraction")
    # how
    batch_size: int = option(16, "rows per forward pass", positive=True)
    device: str = option("auto", "cpu, cuda, cuda:1... (default: cuda when available)")
    output: Any = option(None, "write the results as JSON to this file", path="output")
    overwrite: bool = option(False, "replace an existing --output / --save-reference")
