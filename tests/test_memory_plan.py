"""fastunlearn.plan.memory_plan against exact counts and against measured peaks on CPU.

Measurement: :func:`fastunlearn.plan.peak_memory.peak_tensor_bytes` (the benchmarks' definition too): on
CPU the PyTorch profiler's allocation and free events summed in time order — the live bytes of every
tensor PyTorch's CPU allocator hands out, exact and independent of allocator caching (what
``torch.cuda.max_memory_allocated`` is on a GPU), blind to MKL's and oneDNN's own buffers.

Each phase is measured as a window that starts with the resident state in place (weights, adapters,
optimizer moments and — as in the middle of gradient accumulation — the gradients), and compared with
the plan's peak minus those resident terms (which are checked exactly elsewhere: parameter counts).

Tolerance for peaks: 15 % of the predicted window + 256 KiB. The saved activations are exact (checked
to the byte below); what is modelled rather than enumerated is the transient working set at the peak
moment (the gradient buffers of one operation), and the fixed part covers the small tensors no term
tracks (labels, masks, position ids, per-row statistics, reductions) at these tiny sizes. Observed when
written: measured/predicted between 1.00 and 1.03 in every case but FILA's (0.83, over-predicted).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fastunlearn
from fastunlearn.plan.memory_plan import KNOWN_MODELS, MemoryPlan, model_shape, plan_memory
from fastunlearn.plan.peak_memory import peak_tensor_bytes

RESIDENT_TRAINING = ("weights", "LoRA parameters (fp32)", "LoRA gradients (fp32)", "AdamW moments (fp32)")
CONFIGS = {
    "mha": {"hidden_size": 128, "intermediate_size": 352, "num_attention_heads": 4, "num_key_value_heads": 4},
    "gqa": {"hidden_size": 192, "intermediate_size": 512, "num_attention_heads": 6, "num_key_value_heads": 2},
}


def config_fields(kind: str, layers: int, vocab: int) -> dict:
    return {
        "model_type": "llama",
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        **CONFIGS[kind],
    }


def lora_model(fields: dict, rank: int = 8, dtype=torch.bfloat16, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    args = {k: v for k, v in fields.items() if k != "model_type"}
    model = LlamaForCausalLM(LlamaConfig(**args)).to(dtype)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, lora)


def make_batch(batch: int, length: int, vocab: int, seed: int, padded: bool = True) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    if padded:
        mask[0, -length // 4 :] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, : length // 4] = -100  # the question: no loss
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def window_peak(fn) -> int:
    """Peak live tensor bytes allocated by ``fn()`` above what was live when it started (profiler)."""
    return peak_tensor_bytes(fn, "cpu")


def predicted_window(plan: MemoryPlan, phase: str, resident, *, skip=("optimizer step",)) -> int:
    """The largest moment of ``phase`` (other than ``skip``) without its ``resident`` terms."""
    moments = plan.phase(phase).moments
    return max(
        sum(b for name, b in terms.items() if name not in resident)
        for label, terms in moments.items()
        if label not in skip
    )


def assert_close_to_plan(measured: int, predicted: int) -> None:
    print(f"measured {measured} predicted {predicted} ratio {measured / predicted:.3f}")
    assert abs(measured - predicted) <= 0.15 * predicted + 256 * 1024, (
        f"measured {measured} vs predicted {predicted} ({measured / predicted - 1:+.1%})"
    )


# --------------------------------------------------------------------------------------------------
# Exact arithmetic
# --------------------------------------------------------------------------------------------------


EXTRA_CONFIGS = {
    "tied+bias": {
        **config_fields("gqa", 3, 1000),
        "tie_word_embeddings": True,
        "attention_bias": True,
        "mlp_bias": True,
    },
    "head_dim": {**config_fields("mha", 2, 500), "head_dim": 48},
}


@pytest.mark.parametrize("name", [*KNOWN_MODELS, *EXTRA_CONFIGS])
def test_parameter_counts_equal_the_transformers_model(name):
    fields = KNOWN_MODELS.get(name) or EXTRA_CONFIGS[name]
    shape = model_shape(fields)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in fields.items() if k != "model_type"}))
    assert shape.num_params() == sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings()
    linear = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head
    )
    assert shape.linear_params() == linear


def test_issue_figures_for_llama2_7b():
    # The issue's arithmetic: 6.48 B linear parameters, 25.9 GB of fp32 Fisher accumulators at once.
    shape = model_shape("llama2-7b")
    assert round(shape.linear_params() / 1e9, 2) == 6.48
    plan = plan_memory("llama2-7b", fisher="all_layers")
    terms = dict(plan.phase("fisher_forget").terms)
    assert terms["fp32 accumulators, every target layer"] == 4 * shape.linear_params()


@pytest.mark.parametrize("targets", [None, ["q_proj", "v_proj"], ["down_proj"]])
def test_lora_parameter_count_equals_peft(targets):
    from peft import LoraConfig, get_peft_model

    fields = config_fields("gqa", 2, 300)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in fields.items() if k != "model_type"}))
    lora = LoraConfig(r=4, target_modules=targets or "all-linear")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shape = model_shape(fields)
    assert trainable == shape.lora_params(4, targets or shape.linears())


def saved_bytes(fields: dict, dtype, *, padded: bool, T: int = 32, B: int = 2) -> int:
    """Storage bytes the autograd graph of one LoRA training forward (forget IHL + retain NLL) saves."""
    from fastunlearn.methods.objectives import method_loss

    # The logits path (fused=False): the path whose saved activations the plan's per-layer terms count.
    model = fastunlearn.patch(lora_model(fields, dtype=dtype), fused=False, backend="torch")
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    vocab = fields["vocab_size"]
    batch = {"forget": make_batch(B, T, vocab, 1, padded), "retain": make_batch(B, T, vocab, 2, padded)}
    model.train()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != torch.float32)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        loss, _ = method_loss(model, batch, "ihl")
    del loss
    return sum(seen.values())


@pytest.mark.parametrize(
    "kind, dtype, padded",
    [
        ("mha", torch.bfloat16, True),
        ("gqa", torch.bfloat16, True),
        ("gqa", torch.bfloat16, False),
        ("mha", torch.float32, True),
    ],
)
def test_saved_activations_per_layer_are_exact(kind, dtype, padded):
    # Two more layers save exactly two layers' activations for both batches, and their adapters'
    # autocast copies: the plan's per-layer terms, to the byte.
    name = {torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype]
    measured = saved_bytes(config_fields(kind, 4, 320), dtype, padded=padded) - saved_bytes(
        config_fields(kind, 2, 320), dtype, padded=padded
    )

    def layer_terms(layers: int) -> int:
        plan = plan_memory(
            config_fields(kind, layers, 320),
            batch_size=2,
            max_length=32,
            rank=8,
            dtype=name,
            padded=padded,
            device="cpu",
        )
        terms = plan.phase("train_step").moments["retain loss backward"]
        return sum(b for n, b in terms.items() if n.startswith(("saved activations", "autocast copies")))

    assert measured == layer_terms(4) - layer_terms(2)


# --------------------------------------------------------------------------------------------------
# Measured peaks of the phases
# --------------------------------------------------------------------------------------------------


def trainer_autocast(model):
    """bf16 autocast as Trainer applies it: accelerate wraps the model's forward, so the forget and the
    retain forward are two autocast regions, each casting the adapters itself."""
    model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)
    return model


def training_setup(
    kind: str, layers: int, vocab: int, checkpointing: bool, B: int, T: int, rank: int = 8, **shape
):
    from fastunlearn.training.adapters import _enable_gradient_checkpointing

    fields = {**config_fields(kind, layers, vocab), **shape}
    model = lora_model(fields, rank=rank)
    if checkpointing:
        _enable_gradient_checkpointing(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    batch = {"forget": make_batch(B, T, vocab, 1), "retain": make_batch(B, T, vocab, 2)}
    return fields, model, params, optimizer, batch


@pytest.mark.parametrize(
    "kind, layers, vocab, checkpointing, method, fused",
    [
        ("mha", 2, 1024, False, "ihl", False),
        ("mha", 4, 1024, True, "ihl", False),
        ("gqa", 3, 2048, False, "ihl", True),
        ("gqa", 3, 2048, True, "ihl", False),
        ("mha", 2, 4096, False, "gd", False),
        ("mha", 2, 4096, False, "gd", True),
        ("gqa", 3, 2048, True, "npo", True),
        ("mha", 2, 2048, False, "npo", False),
        ("gqa", 2, 1024, True, "ga", False),
        ("gqa", 2, 1024, True, "ga", True),
        ("mha", 4, 1024, True, "ihl", True),
    ],
)
def test_train_step_peak(kind, layers, vocab, checkpointing, method, fused):
    from fastunlearn.methods.objectives import method_loss

    B, T = 2, 64
    fields, model, _, optimizer, batch = training_setup(kind, layers, vocab, checkpointing, B, T)
    trainer_autocast(fastunlearn.patch(model, fused=fused, backend="torch"))
    if method == "npo":  # the reference log-probabilities (their values do not matter here)
        batch["forget"]["ref_logp"] = torch.zeros(B)

    def forward_backward():
        loss, _ = method_loss(model, batch, method)
        loss.backward()

    forward_backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)  # gradients stay allocated, as between accumulation steps
    measured = window_peak(forward_backward)
    plan = plan_memory(
        fields,
        batch_size=B,
        max_length=T,
        rank=8,
        method=method,
        init="lora",
        gradient_checkpointing=checkpointing,
        fused_linear=fused,
        device="cpu",
    )
    assert_close_to_plan(measured, predicted_window(plan, "train_step", RESIDENT_TRAINING))


def test_train_step_per_layer_at_two_ranks():
    # With checkpointing, every adapter's retain gradient waits for the forget graph's (4n) while the
    # forget graph is differentiated. Against a batch's tokens a large rank makes that the step's
    # peak, and the per-layer figure is a layer input plus 4·(adapters of a layer) instead of two
    # layer inputs: bench_scale (Llama-2-7B width, r = 32, 2×128 tokens) measured 7.1 MB a layer
    # against 4.2 MB planned (then under one autocast region, where the wait is in bf16). Same
    # proportions at a quarter of the width (the ratio is r/N): K = 1 and 2; r = 32, and r = 8, where
    # the plan's peak is the retain graph's top layer and the measured one its first layer (the plan
    # over-predicts the top layer's fixed bytes by ~1 MB here): 1.09× per layer when written.
    from fastunlearn.methods.objectives import method_loss

    B, T, shape = 2, 128, {"hidden_size": 1024, "intermediate_size": 2752, "num_attention_heads": 8}
    shape["num_key_value_heads"] = 8

    def measured_and_planned(layers: int, rank: int) -> tuple[int, int]:
        fields, model, params, optimizer, batch = training_setup(
            "mha", layers, 512, True, B, T, rank=rank, **shape
        )
        trainer_autocast(fastunlearn.patch(model, fused=True, backend="torch"))

        def step():  # bench_scale's training step
            loss, _ = method_loss(model, batch, "ihl")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)

        step()
        plan = plan_memory(
            fields,
            batch_size=B,
            max_length=T,
            rank=rank,
            init="lora",
            gradient_checkpointing=True,
            device="cpu",
        )
        return window_peak(step), predicted_window(plan, "train_step", RESIDENT_TRAINING, skip=())

    for rank in (8, 32):
        (m1, p1), (m2, p2) = measured_and_planned(1, rank), measured_and_planned(2, rank)
        assert_close_to_plan(m2 - m1, p2 - p1)


def test_optimizer_step_peak():
    fields, _, params, optimizer, _ = training_setup("gqa", 2, 512, False, 2, 16)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()  # the moments exist

    def step():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    measured = window_peak(step)
    plan = plan_memory(fields, rank=8, init="lora", device="cpu")
    predicted = plan.phase("train_step").moments["optimizer step"]["AdamW foreach temporaries"]
    assert_close_to_plan(measured, predicted)


@pytest.mark.parametrize("kind, layers, vocab", [("mha", 2, 1024), ("gqa", 3, 2048)])
def test_fisher_peak(kind, layers, vocab):
    from fastunlearn.fisher import estimate_fisher

    B, T = 2, 48
    fields = config_fields(kind, layers, vocab)
    model = lora_model(fields)
    batches = [make_batch(B, T, vocab, seed) for seed in (3, 4)]
    measured = window_peak(lambda: estimate_fisher(model, batches, backend="torch", progress=False))
    plan = plan_memory(fields, fisher_batch_size=B, max_length=T, rank=8, fisher="all_layers", device="cpu")
    resident = ("weights", "LoRA parameters (fp32)")
    assert_close_to_plan(measured, predicted_window(plan, "fisher_forget", resident))


def test_fila_peak():
    from fastunlearn.fisher import fila_init

    fields = config_fields("gqa", 2, 512)
    model = lora_model(fields)
    gen = torch.Generator().manual_seed(5)
    shapes = {n: m.weight.shape for n, m in model.named_modules() if n.endswith("base_layer")}
    forget = {n: torch.rand(s, generator=gen) for n, s in shapes.items()}
    retain = {n: torch.rand(s, generator=gen) for n, s in shapes.items()}
    measured = window_peak(lambda: fila_init(model, forget, retain, solver="svd"))
    plan = plan_memory(fields, rank=8, fila_solver="svd", device="cpu")
    assert_close_to_plan(measured, predicted_window(plan, "fila", ("weights", "LoRA parameters (fp32)")))


@pytest.mark.parametrize("shape", [(700, 300), (300, 1100)])
def test_truncated_solver_workspace_is_within_the_plan(shape):
    from fastunlearn.fisher.solver import solve_truncated_svd

    out, n_in = shape
    fields = {
        "model_type": "llama",
        "hidden_size": min(shape),
        "intermediate_size": max(shape),
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "vocab_size": 100,
    }
    A = torch.randn(out, n_in, generator=torch.Generator().manual_seed(6))
    measured = window_peak(lambda: solve_truncated_svd(A, 8))
    plan = plan_memory(fields, rank=8, fila_solver="truncated", device="cpu")
    workspace = plan.phase("fila").moments
    bound = max(t["fp32 workspace of one layer"] for t in workspace.values()) - 3 * 4 * out * n_in
    assert measured <= bound


@pytest.mark.parametrize("fused", [True, False])
def test_evaluate_peak(fused):
    from fastunlearn.evaluation.likelihood import basic_metrics

    fields = config_fields("mha", 2, 2048)
    model = fastunlearn.patch(lora_model(fields), fused=fused, backend="torch")
    batches = [make_batch(4, 64, 2048, 7)]
    measured = window_peak(lambda: basic_metrics(model, batches))
    plan = plan_memory(fields, rank=8, eval_batch_size=4, max_length=64, fused_linear=fused, device="cpu")
    resident = ("weights", "LoRA parameters (fp32)", "AdamW moments (fp32)")
    moments = plan.phase("evaluate").moments
    predicted = max(
        sum(b for name, b in terms.items() if name not in resident)
        for label, terms in moments.items()
        if label.startswith("after training")
    )
    assert_close_to_plan(measured, predicted)


def test_save_adapter_peak(tmp_path):
    from fastunlearn.fisher import fila_init, save_adapter

    fields = config_fields("mha", 2, 512)
    model = lora_model(fields)
    shapes = {n: m.weight.shape for n, m in model.named_modules() if n.endswith("base_layer")}
    fila_init(
        model, {n: torch.rand(s) for n, s in shapes.items()}, {n: torch.rand(s) for n, s in shapes.items()}
    )
    measured = window_peak(lambda: save_adapter(model, tmp_path / "adapter"))
    plan = plan_memory(fields, rank=8, device="cpu")
    resident = ("weights", "LoRA parameters (fp32)", "AdamW moments (fp32)")
    assert_close_to_plan(measured, predicted_window(plan, "save", resident))


# --------------------------------------------------------------------------------------------------
# The plan's structure, settings and errors
# --------------------------------------------------------------------------------------------------


def test_design_choices_move_the_peaks_the_right_way():
    base = plan_memory("llama2-7b")
    checkpointed = plan_memory("llama2-7b", gradient_checkpointing=True)
    assert checkpointed.phase("train_step").peak_bytes < base.phase("train_step").peak_bytes
    assert (
        plan_memory("llama2-7b", fisher="all_layers").phase("fisher_forget").peak_bytes
        > base.phase("fisher_forget").peak_bytes
    )
    fused = plan_memory("llama3-8b", fused_linear=True, method="ihl")
    logits = plan_memory("llama3-8b", fused_linear=False, method="ihl")
    assert fused.phase("train_step").peak_bytes < logits.phase("train_step").peak_bytes
    assert dict(fused.phase("train_step").moments["top layer backward"])[
        "forget: ∂L/∂h formed in the forward (fused)"
    ]
    whole = 2 * model_shape("llama2-70b").num_params()
    zero3 = plan_memory("llama2-70b", engine="zero3", world_size=8, gradient_checkpointing=True)
    assert dict(zero3.phase("load").terms)["weights (1/8 shard)"] == -(-whole // 8)
    # fastunlearn's FSDP shards after FILA: whole weights until then, the shard in training.
    fsdp = plan_memory("llama2-70b", engine="fsdp", world_size=8, gradient_checkpointing=True)
    assert dict(fsdp.phase("load").terms)["weights (whole until FILA)"] == whole
    assert dict(fsdp.phase("fisher_forget").terms)["weights (whole until FILA)"] == whole
    assert dict(fsdp.phase("train_step").terms)["weights (1/8 shard)"] == -(-whole // 8)


def test_to_json_and_table(tmp_path):
    plan = plan_memory("llama3-8b", gradient_checkpointing=True)
    data = json.loads(json.dumps(plan.to_json()))
    assert data["model"] == "llama3-8b"
    names = [p["name"] for p in data["phases"]]
    assert names == ["load", "evaluate", "fisher_forget", "fisher_retain", "fila", "train_step", "save"]
    assert data["peak_bytes"] == max(p["peak_bytes"] for p in data["phases"])
    for p in data["phases"]:
        assert p["peak_bytes"] == sum(t["bytes"] for t in p["terms"])
    table = plan.format_table(terms=True)
    assert all(name in table for name in names)


def test_config_sources(tmp_path):
    fields = KNOWN_MODELS["llama3-8b"]
    (tmp_path / "config.json").write_text(json.dumps(fields))
    from_name = model_shape("llama3-8b")
    for source in (
        tmp_path,
        tmp_path / "config.json",
        dict(fields),
        LlamaConfig(**{k: v for k, v in fields.items() if k != "model_type"}),
    ):
        shape = model_shape(source)
        assert (shape.hidden, shape.intermediate, shape.layers, shape.kv_heads, shape.vocab) == (
            from_name.hidden,
            from_name.intermediate,
            from_name.layers,
            from_name.kv_heads,
            from_name.vocab,
        )


def test_buffer_sizes_match_the_code_they_describe():
    # memory_plan restates a few buffer sizes rather than importing the modules that own them (it is
    # pure arithmetic, importable without torch): each must still be the size the code uses.
    import inspect

    from fastunlearn.fisher import solver
    from fastunlearn.ops import _ihl_torch, fused_linear, grad_sq
    from fastunlearn.plan import memory_plan

    assert memory_plan._IHL_CHUNK_ELEMENTS == fused_linear.CHUNK_ELEMENTS
    assert memory_plan._IHL_CPU_CHUNK_ELEMENTS == fused_linear.CPU_CHUNK_ELEMENTS
    assert memory_plan._IHL_CPU_BLOCK == _ihl_torch.CPU_BLOCK_ELEMENTS
    width = inspect.signature(_ihl_torch._first_argmax).parameters["width"].default
    assert width == memory_plan._ARGMAX_WINDOW
    assert memory_plan._FISHER_TORCH_BUFFER == grad_sq.TORCH_BUFFER_BYTES
    assert memory_plan._SOLVER_CHUNK_BYTES == 8 * solver._CHUNK_ELEMENTS
    defaults = inspect.signature(solver.solve_truncated_svd).parameters
    assert defaults["max_iters"].default == memory_plan._SOLVER_MAX_ITERS
    assert torch.get_rng_state().numel() == memory_plan._CPU_RNG_STATE


def test_constants_match_the_training_layer():
    from fastunlearn.methods import METHODS, NEEDS_RETAIN
    from fastunlearn.options.unlearn import INITS
    from fastunlearn.plan import memory_plan

    assert memory_plan.INITS == INITS and memory_plan.METHODS == METHODS
    assert set(memory_plan._NEEDS_RETAIN) == set(NEEDS_RETAIN)


@pytest.mark.parametrize(
    "config, kwargs, error, match",
    [
        ("llama-9b", {}, FileNotFoundError, "neither a known model"),
        ({"model_type": "llama", "hidden_size": 64}, {}, ValueError, "'intermediate_size'"),
        ({**KNOWN_MODELS["llama2-7b"], "model_type": "gpt2"}, {}, ValueError, "model_type 'gpt2'"),
        ({**KNOWN_MODELS["llama2-7b"], "vocab_size": 0}, {}, ValueError, "'vocab_size'"),
        ("llama2-7b", {"engine": "none", "world_size": 2}, ValueError, "world_size"),
        ("llama2-7b", {"engine": "deepspeed"}, ValueError, "engine"),
        ("llama2-7b", {"target_modules": ["qkv"]}, ValueError, "target_modules"),
        ("llama2-7b", {"rank": 5000}, ValueError, "rank"),
        ("llama2-7b", {"batch_size": 0}, ValueError, "batch_size"),
        ("llama2-7b", {"fisher_memory": 1000}, ValueError, "fisher_memory"),
        ("llama2-7b", {"dtype": "int8"}, ValueError, "dtype"),
    ],
)
def test_bad_input(config, kwargs, error, match):
    with pytest.raises(error, match=match):
        plan_memory(config, **kwargs)
