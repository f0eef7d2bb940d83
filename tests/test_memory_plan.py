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

from fastunlearn.fisher import fila_row_weights
from fastunlearn.ops import _ihl_torch
from fastunlearn.options.unlearn import UnlearnConfig
from fastunlearn.plan.peak_memory import step_peaks
from fastunlearn.plan.phases import PhaseRunner, Setting, measure_phases
from fastunlearn.plan.plan import model_config, plan_memory

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENS = 256
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "vocab_size": 16381}
ARCHITECTURES = {
    "llama": {"model_type": "llama", "num_hidden_layers": 1, "num_key_value_heads": 2},
    "mistral": {
        "model_type": "mistral",
        "num_hidden_layers": 1,
        "num_key_value_heads": 2,
        "sliding_window": 64,
    },
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
    # The reference: a copy of the model (full fine-tuning's KL), log-probabilities of two parts (DPO),
    # the activations at RMU's layer with the adapters switched off.
    ("llama", "fp32", {"init": "full", "method": "npo+kl"}),
    ("qwen2", "bf16", {"init": "lora", "method": "dpo"}),
    ("llama", "fp32", {"init": "lora", "method": "rmu"}),
]


@pytest.fixture(autouse=True)
def small_row_blocks(monkeypatch):
    monkeypatch.setattr(_ihl_torch, "CPU_BLOCK_ELEMENTS", 1024)


def run_config(**options) -> UnlearnConfig:
    base = {
        "lora_r": 4,
        "batch_size": 2,
        "fisher_batch_size": 2,
        "eval_batch_size": 3,
        "fisher_memory": "1MiB",
    }
    return UnlearnConfig(**{**base, **options})


@pytest.mark.parametrize(
    "architecture, precision, options", CASES, ids=[f"{c[0]}-{c[2]['method']}-{c[2]['init']}" for c in CASES]
)
def test_each_phase_is_planned_as_it_runs(architecture, precision, options):
    config = tiny(architecture)
    cfg = run_config(**options)
    plan = plan_memory(cfg, config=config, tokens=TOKENS, device="cpu", precision=precision)
    torch.manual_seed(0)
    measured = measure_phases(cfg, Setting(config, TOKENS, precision))
    assert [p.name for p in plan.phases] == list(measured)
    for phase in plan.phases:
        assert phase.peak_bytes == pytest.approx(measured[phase.name], rel=0.02), phase.name
        assert sum(phase.kinds.values()) == phase.peak_bytes


def tiny(architecture: str = "llama", **fields):
    return model_config({**SMALL, **ARCHITECTURES[architecture], **fields})


def tensor_bytes(config, *, quantised: int | None = None) -> int:
    """Bytes of a model's parameters and buffers (fp32), built on the meta device; with ``quantised``
    bits, every linear layer but the output head stored as bitsandbytes stores it: NF4 with double
    quantisation (half a byte a weight, a byte per block of 64, four per 256 blocks, 1092 bytes of
    code tables) or LLM.int8 (a byte a weight, an fp32 scale per row)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    total = sum(4 * t.numel() for t in [*model.parameters(), *model.buffers()])
    for module in model.modules():
        if quantised and isinstance(module, torch.nn.Linear) and module is not head:
            n, rows = module.weight.numel(), module.weight.shape[0]
            stored = n // 2 + n // 64 + 4 * -(-n // (64 * 256)) + 1092 if quantised == 4 else n + 4 * rows
            total += stored - 4 * n
    return total


def test_the_kinds_say_what():
    """A LoRA step: the frozen weights exactly, the adapters and their gradients (fp32), the optimiser's
    two moments and more, activations, and the loss at the output head."""
    config = tiny()
    plan = plan_memory(run_config(init="lora", evaluate=False), config=config, tokens=TOKENS, device="cpu")
    assert plan.phase("load").kinds == {"weights": tensor_bytes(config)}
    # q, k, v, o (32 and 16 wide: two key/value heads of 8), gate, up, down: r·(in + out) each, fp32
    shapes = [(32, 32), (16, 32), (16, 32), (32, 32), (64, 32), (64, 32), (32, 64)]
    lora = 4 * sum(4 * (out + n_in) for out, n_in in shapes)
    step = plan.phase("train_step")
    assert step.kinds["weights"] == tensor_bytes(config)
    assert step.kinds["trainable"] == 2 * lora  # the adapters and their gradients (accumulated)
    assert step.kinds["optimizer"] >= 2 * lora  # AdamW's two moments
    assert step.kinds["activations"] > 0 and step.kinds["loss"] > 0


def test_quantised_bases_count_their_weights_as_stored():
    config = tiny()
    for bits in (4, 8):
        cfg = run_config(init="lora", evaluate=False)
        cfg.load_in_4bit, cfg.load_in_8bit = bits == 4, bits == 8  # ModelAccess's options
        plan = plan_memory(cfg, config=config, tokens=TOKENS, device="cpu", precision="fp32")
        assert plan.phase("load").peak_bytes == tensor_bytes(config, quantised=bits)


def test_sharded_engines_divide_the_resident_state():
    config = tiny()
    cfg = run_config(init="lora", evaluate=False)
    alone = plan_memory(cfg, config=config, tokens=TOKENS, device="cpu")
    sharded = plan_memory(cfg, config=config, tokens=TOKENS, device="cpu", engine="zero3", world_size=4)
    for one, shard in zip(alone.phases, sharded.phases):
        for kind, size in one.kinds.items():
            divided = kind in ("weights", "trainable", "optimizer")
            assert shard.kinds[kind] == (-(-size // 4) if divided else size)
    assert any("divided by 4 devices" in note for note in sharded.notes)


def test_a_gpu_plan_leaves_host_copies_out():
    """FILA's records of A₀ and B₀ go to the host: on a CPU run that is the device, on a GPU's it is not."""
    config = tiny()
    cfg = run_config(init="fila", evaluate=False)
    on_cpu = plan_memory(cfg, config=config, tokens=TOKENS, device="cpu", precision="fp32")
    on_gpu = plan_memory(cfg, config=config, tokens=TOKENS, device="cuda", precision="fp32")
    assert on_cpu.phase("save").kinds["host"] > 0 and "host" not in on_gpu.phase("save").kinds
    assert on_gpu.context_bytes > 0 == on_cpu.context_bytes


def test_the_planned_fisher_groups_hold_the_peak_of_all_groups():
    """The plan runs the passes of the groups that can peak; the run passes every group."""
    config = tiny(num_hidden_layers=2)
    cfg = run_config(init="fila", evaluate=False, fisher_memory="48KiB")
    plan = plan_memory(cfg, config=config, tokens=TOKENS, device="cpu", precision="fp32")
    runner = PhaseRunner(cfg, Setting(config, TOKENS, "fp32"))

    def every_group():
        forget, retain = [runner.batch(2)], [runner.batch(2)]
        fila_row_weights(runner.model, forget, retain, max_memory=runner.budget, progress=False)

    def run_up_to_every_group():
        for phase, step, _, call in runner.steps():
            if phase == "fisher" and step != "adapters":
                yield every_group
                return
            yield call

    torch.manual_seed(0)
    peak = step_peaks(run_up_to_every_group())[-1]
    assert runner.groups > 2 and plan.phase("fisher").step.startswith("passes over")
    assert plan.phase("fisher").peak_bytes == pytest.approx(peak, rel=0.02)
