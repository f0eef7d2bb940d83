"""The memory plan (phases on fake tensors) against the same phases run on real CPU tensors.

For tiny one-layer models of every architecture ``fastunlearn.patch`` supports, each phase's planned
peak (:func:`fastunlearn.plan.plan.plan_memory`, ``device="cpu"``) must equal the peak of live tensor
bytes measured while :func:`fastunlearn.plan.phases.measure_phases` runs the same steps on real tensors
(the profiler's allocation events, :mod:`fastunlearn.plan.peak_memory`) within 2 %. The cases spread
the options over the architectures: every initialisation, method, both loss paths, checkpointing on
and off, fp32 and bf16.

What the fake run cannot see, made negligible here: scratch an operator allocates and frees inside
itself (LAPACK's SVD workspace; the row kernels' ``logsumexp`` over a block of rows, whose blocks are
made 4 kB; the plan runs the row kernels as the GPU's, without blocks), and the labelled rows of an
evaluation batch (the plan counts every token; the real batch has ``B + 1`` fewer of its ``B·T``).
"""

from __future__ import annotations

import pytest
import torch

from fastunlearn.ops import _ihl_torch
from fastunlearn.options.unlearn import UnlearnConfig
from fastunlearn.plan.configs import KNOWN_MODELS, model_config
from fastunlearn.plan.phases import Setting, measure_phases, quantised_bytes
from fastunlearn.plan.plan import plan_memory

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENS = 256
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "vocab_size": 16381}
ARCHITECTURES = {
    "llama": {"model_type": "llama", "num_hidden_layers": 1, "num_key_value_heads": 2},
    "mistral": {"model_type": "mistral", "num_hidden_layers": 1, "num_key_value_heads": 2, "sliding_window": 64},
    "qwen2": {"model_type": "qwen2", "num_hidden_layers": 1, "num_key_value_heads": 2},
    "phi": {"model_type": "phi", "num_hidden_layers": 1},
    "gpt_neo": {
        "model_type": "gpt_neo",
        "num_layers": 1,
        "num_heads": 4,
        "attention_types": [[["local"], 1]],
        "window_size": 64,
        "bos_token_id": 0,
        "eos_token_id": 0,
    },
    "gpt_neox": {"model_type": "gpt_neox", "num_hidden_layers": 1},
    # Soft-capped logits: the losses take the logits path.
    "gemma2": {"model_type": "gemma2", "num_hidden_layers": 1, "num_key_value_heads": 2, "head_dim": 8},
}
CASES = [
    ("llama", "fp32", {"init": "fila", "method": "ihl", "gradient_checkpointing": True}),
    ("mistral", "bf16", {"init": "lora", "method": "gd", "fused": False, "gradient_accumulation_steps": 1}),
    ("qwen2", "fp32", {"init": "full", "method": "ga", "gradient_checkpointing": True}),
    ("phi", "fp32", {"init": "fila", "method": "npo", "fused": False, "fila_solver": "randomized"}),
    ("gpt_neo", "bf16", {"init": "lora", "method": "ihl", "gradient_checkpointing": True, "merge": True}),
    ("gpt_neox", "bf16", {"init": "fila", "method": "ihl", "lora_dropout": 0.1}),
    ("gemma2", "fp32", {"init": "lora", "method": "npo", "gradient_checkpointing": True}),
]


@pytest.fixture(autouse=True)
def small_row_blocks(monkeypatch):
    monkeypatch.setattr(_ihl_torch, "CPU_BLOCK_ELEMENTS", 1024)


def run_config(**options) -> UnlearnConfig:
    base = {"lora_r": 4, "batch_size": 2, "fisher_batch_size": 2, "eval_batch_size": 3, "fisher_memory": "1MiB"}
    return UnlearnConfig(**{**base, **options})


@pytest.mark.parametrize("architecture, precision, options", CASES, ids=[c[0] for c in CASES])
def test_each_phase_is_planned_as_it_runs(architecture, precision, options):
    config = model_config({**SMALL, **ARCHITECTURES[architecture]})
    cfg = run_config(**options)
    plan = plan_memory(cfg, config=config, tokens=TOKENS, device="cpu", precision=precision)
    torch.manual_seed(0)
    measured = measure_phases(cfg, Setting(config, TOKENS, precision))
    assert [p.name for p in plan.phases] == list(measured)
    for phase in plan.phases:
        assert phase.peak_bytes == pytest.approx(measured[phase.name], rel=0.02), phase.name
        assert sum(phase.kinds.values()) == phase.peak_bytes


def test_the_kinds_say_what():
    """The kinds of a training step: the frozen weights exactly, the adapters and their gradients, the
    optimiser's two moments, the activations, the loss at the output head."""
    config = model_config({**SMALL, **ARCHITECTURES["llama"]})
    plan = plan_memory(run_config(init="lora"), config=config, tokens=TOKENS, device="cpu")
    weights = sum(p.numel() * 4 for p in torch.nn.Module.__new__(torch.nn.Module).parameters())
    step = plan.phase("train_step")
    frozen = sum(4 * n for n in _parameter_counts(config))
    assert step.kinds["weights"] >= frozen > weights
    lora = plan.phase("evaluate").kinds["trainable"]
    assert step.kinds["optimizer"] >= 2 * lora  # exp_avg and exp_avg_sq, fp32
    assert step.kinds["trainable"] == 2 * lora  # parameters and their gradients
    assert step.kinds["activations"] > 0 and step.kinds["loss"] > 0


def _parameter_counts(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [p.numel() for p in model.parameters()]
