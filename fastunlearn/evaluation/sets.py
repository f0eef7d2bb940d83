"""The metrics of a run's own data, named as the stopping rules name them (``forget.prob``,
``retain.rougeL``, ``muse.knowmem_forget``...): :class:`SetEvaluator`."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch

from fastunlearn import data as fdata
from fastunlearn.engines import distributed
from fastunlearn.evaluation.decoding import greedy_completions
from fastunlearn.evaluation.evaluator import evaluate, headline
from fastunlearn.evaluation.extraction import extraction_likelihood
from fastunlearn.evaluation.likelihood import collect_answer_stats
from fastunlearn.evaluation.metrics import rouge_l_recall
from fastunlearn.evaluation.stopping import EL_N, available_metrics

_TEACHER_FORCED = ("prob", "acc", "nll", "ma")
_STATS = ("nll_sum", "num_tokens", "correct")


def _spread(examples: Sequence[fdata.Example], k: int | None) -> list[fdata.Example]:
    """``k`` examples evenly spaced over the set (its first, then every ``len/k``-th): a subset that
    spans files sorted by topic (TOFU lists each author's questions together), with no randomness."""
    n = len(examples)
    return list(examples) if k is None or n <= k else [examples[(i * n) // k] for i in range(k)]


def _record_format(examples: Sequence[fdata.Example]) -> str:
    """``"text"`` when every token is labelled (raw text), ``"qa"`` when every example has an unlabelled
    prompt (question/answer or prompt/completion), else ``"mixed"``."""
    prompted = [ex.labels[0] == fdata.IGNORE_INDEX for ex in examples]
    return "qa" if all(prompted) else "text" if not any(prompted) else "mixed"


def _forced_metrics(
    nll_sum: torch.Tensor, tokens: torch.Tensor, correct: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The teacher-forced metrics of one set from its per-example statistics (fp64, ``[N]`` each)."""
    mean_nll = nll_sum / tokens
    return {
        "prob": torch.exp(-mean_nll).mean(),
        "acc": correct.sum() / tokens.sum(),
        "nll": mean_nll.mean(),
        # Raw text labels every token: correct / tokens is Jang et al.'s MA of each sequence.
        "ma": (correct / tokens).mean(),
    }


class SetEvaluator:
    """The metrics of a run on its forget / retain / unseen (raw text) tokenised examples.

    Each set is cut to ``eval_items`` examples spread evenly over it. The teacher-forced metrics of all
    sets come from one pass sorted by length; ``rougeL`` scores the greedy answer to the training prompt
    (at most ``min(max_new_tokens, 2 × the reference's tokens)`` new tokens), ``el10`` is the extraction
    likelihood, ``muse.*`` come from the MUSE evaluation with the options ``muse``. The model runs under
    ``no_grad``, not ``inference_mode``, which breaks FSDP's next training forward (pytorch#113203).
    """

    def __init__(
        self,
        tokenizer: Any,
        forget: Sequence[fdata.Example],
        retain: Sequence[fdata.Example] | None = None,
        unseen: Sequence[fdata.Example] | None = None,
        *,
        eval_items: int | None = 32,
        batch_size: int = 16,
        max_new_tokens: int = 200,
        muse: Mapping[str, Any] | None = None,
    ) -> None:
        for name, value in (
            ("eval_items", 1 if eval_items is None else eval_items),
            ("batch_size", batch_size),
            ("max_new_tokens", max_new_tokens),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        self.tokenizer, self.batch_size, self.max_new_tokens = tokenizer, batch_size, max_new_tokens
        self.pad_id = fdata.pad_id_of(tokenizer)
        self.muse = None if muse is None else dict(muse)
        self.sets: dict[str, list[fdata.Example]] = {}
        for name, examples in (("forget", forget), ("retain", retain), ("unseen", unseen)):
            if examples:
                self.sets[name] = _spread(examples, eval_items)
        if "forget" not in self.sets:
            raise ValueError("the forget set is empty: there is nothing to evaluate")
        formats = {name: _record_format(examples) for name, examples in self.sets.items()}
        if formats.get("unseen", "text") != "text":
            raise ValueError('unseen text must be raw text ({"text"} records, every token labelled)')
        self.available = available_metrics({**formats, **({"muse": "muse"} if muse is not None else {})})
        # Built on first use, then reused: the sets (and each process's share of them) are fixed.
        self._forced_inputs: dict[tuple, tuple[list[dict[str, torch.Tensor]], torch.Tensor]] = {}
        self._generation_inputs: dict[str, tuple[list[torch.Tensor], list[str], list[int]]] = {}

    def evaluate(self, model: torch.nn.Module, names: Collection[str]) -> dict[str, float]:
        """The metrics ``names`` (``SET.KIND``) of ``model``; under several processes every rank calls
        it, the ranks share the examples and every rank gets the main process's numbers."""
        unknown = sorted(set(names) - self.available)
        if unknown:
            raise ValueError(f"cannot evaluate {unknown} on this data; available: {sorted(self.available)}")
        wanted: dict[str, list[str]] = {}
        # In a fixed order: the ranks' shared evaluations must come in the same sequence on every rank.
        for name in sorted(names):
            set_name, _, kind = name.partition(".")
            wanted.setdefault(set_name, []).append(kind)
        muse = wanted.pop("muse", None)
        forced = {s: [k for k in wanted[s] if k in _TEACHER_FORCED] for s in self.sets if s in wanted}
        out = self._teacher_forced(model, {s: kinds for s, kinds in forced.items() if kinds})
        for set_name, kinds in wanted.items():
            if "rougeL" in kinds:
                out[f"{set_name}.rougeL"] = self._rouge(model, set_name)
            if f"el{EL_N}" in kinds:
                out[f"{set_name}.el{EL_N}"] = self._el(model, set_name)
        if muse:
            numbers = headline(evaluate(model, self.tokenizer, muse={**self.muse, "criteria": muse}))
            out.update({f"muse.{k}": numbers[f"muse.{k}"] for k in muse})
        return distributed.broadcast_object(out)

    def results(
        self, model: torch.nn.Module, kinds: Sequence[str] = ("prob", "acc", "nll")
    ) -> dict[str, Any]:
        """``{set: {kind: value}}`` of the forget and retain sets (a run's before / after metrics)."""
        sets = [s for s in ("forget", "retain") if s in self.sets]
        values = self.evaluate(model, [f"{s}.{k}" for s in sets for k in kinds])
        return {s: {k: values[f"{s}.{k}"] for k in kinds} for s in sets}

    def _teacher_forced(self, model: torch.nn.Module, kinds: Mapping[str, Sequence[str]]) -> dict[str, float]:
        """``kinds[set]`` of every set in ``kinds``, from one teacher-forced pass over all their examples."""
        if not kinds:
            return {}
        set_names = tuple(kinds)

        def stats_of(share: list[fdata.Example]) -> dict[str, torch.Tensor]:
            # This process's share as padded batches sorted by length (built once), and the permutation
            # that puts their rows back in order.
            key = (set_names, len(share))
            if key not in self._forced_inputs:
                order = sorted(range(len(share)), key=lambda i: len(share[i].input_ids), reverse=True)
                batches = fdata.batches([share[i] for i in order], self.pad_id, self.batch_size)
                self._forced_inputs[key] = (batches, torch.tensor(order).argsort())
            batches, unsort = self._forced_inputs[key]
            stats = collect_answer_stats(model, batches)
            return {k: stats[k][unsort.to(stats[k].device)] for k in _STATS}

        examples = [ex for name in set_names for ex in self.sets[name]]
        stats = distributed.map_sharded(stats_of, examples, model=model)  # gathered in example order
        sizes = [len(self.sets[name]) for name in set_names]
        names, values = [], []
        for set_name, *per_set in zip(set_names, *(stats[k].double().split(sizes) for k in _STATS)):
            per_kind = _forced_metrics(*per_set)
            names += [f"{set_name}.{kind}" for kind in kinds[set_name]]
            values += [per_kind[kind] for kind in kinds[set_name]]
        return dict(zip(names, torch.stack(values).tolist()))  # one transfer for all of them

    def _rouge(self, model: torch.nn.Module, set_name: str) -> float:
        """ROUGE-L recall of the greedy answers to the set's prompts; the prompts, reference answers
        (decoded text) and token budgets are built once."""
        if set_name not in self._generation_inputs:
            eos = self.tokenizer.eos_token_id
            prompts, references, budgets = [], [], []
            for ex in self.sets[set_name]:
                start = next(i for i, label in enumerate(ex.labels) if label != fdata.IGNORE_INDEX)
                answer = list(ex.input_ids[start:])
                if answer and answer[-1] == eos:
                    answer = answer[:-1]
                prompts.append(torch.tensor(ex.input_ids[:start], dtype=torch.long))
                references.append(self.tokenizer.decode(answer, skip_special_tokens=True).strip())
                budgets.append(min(self.max_new_tokens, 2 * max(len(answer), 1)))
            self._generation_inputs[set_name] = (prompts, references, budgets)
        prompts, references, budgets = self._generation_inputs[set_name]

        def generate(rows: list[int]) -> list[str]:
            chosen = [prompts[i] for i in rows]
            return greedy_completions(
                model, self.tokenizer, chosen, [budgets[i] for i in rows], batch_size=self.batch_size
            )

        answers = distributed.map_sharded(generate, range(len(prompts)), model=model)
        return sum(rouge_l_recall(answers, references)) / len(answers)

    def _el(self, model: torch.nn.Module, set_name: str) -> float:
        def el(share: list[fdata.Example]) -> torch.Tensor:
            batch = fdata.collate(share, self.pad_id)
            ids, mask = batch["input_ids"], batch["attention_mask"]
            return extraction_likelihood(model, ids, n=EL_N, attention_mask=mask, batch_size=self.batch_size)

        return distributed.map_sharded(el, self.sets[set_name], model=model).mean().item()
