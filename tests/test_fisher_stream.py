"""Fisher estimation under a memory budget and with activation checkpointing, and FILA's streamed row weights.

The claims (issue 12): a layer's estimate does not depend on how the layers are grouped into passes,
nor on whether the decoder layers are checkpointed; the row weights ``d`` streamed group by group
equal the ``d`` of two whole estimates; FILA from them gives the same adapters.

Tolerances. Grouping and checkpointing change only which other layers are measured in a pass and
whether a block's activations are kept or recomputed; a layer's ``X`` and ``G`` come from the same
operations on the same data either way (on this machine they are bit for bit equal). The tolerances
only allow for BLAS results that depend on buffer alignment (MKL without ``MKL_CBWR``): an fp64 model's
``G`` then differs in its last bits, which the fp32 accumulation rounds to within a few fp32 ulps:
rtol 1e-6. In an fp32 model the same differences are fp32 ulps of the activations, amplified by the
sums over ≤ 12 tokens before squaring: rtol 1e-4, and an absolute allowance of 1e-6 of a layer's
largest entry for elements near zero (as the Triton-vs-PyTorch test). ``d`` is the square root of
row sums of non-negative ratios: at most the same relative error. The FILA factors from ``d`` within
that tolerance: the fp32 SVD's ``[DW]_r`` moves by the relative change of ``d`` times ``σ_1/(σ_r −
σ_{r+1})`` (below 100 here), so rtol 1e-4 of the largest entry of ``s·B₀A₀``.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from helpers.fisher import VOCAB, fisher_llama, make_batch, per_example_oracle
from torch import nn

from fastunlearn.fisher import (
    FilaRowWeights,
    FisherEstimate,
    FisherFile,
    estimate_fisher,
    fila_init,
    fila_row_weights,
    linear_layers,
    lora_layers,
    parse_bytes,
    save_fisher,
    select_linear_layers,
)
from fastunlearn.fisher.budget import plan_groups

MLP = ["gate_proj", "up_proj", "down_proj"]  # all 48×32 or 32×48: 1536 weights, 6144 bytes in fp32
LAYER_BYTES = 4 * 1536


@pytest.fixture(scope="module")
def model():
    return fisher_llama()


@pytest.fixture(scope="module")
def batches():
    second = make_batch(3, 9, seed=2, pad_rows=[(0, 6)])
    second["labels"][2] = -100  # an example without a label token
    return [make_batch(4, 12, seed=1, pad_rows=[(1, 8), (3, 5)]), second]


@pytest.fixture(scope="module")
def retain():
    return [make_batch(4, 10, seed=5, pad_rows=[(2, 7)]), make_batch(2, 11, seed=6)]


def tolerance(dtype):
    return {"rtol": 1e-6, "atol_scale": 0.0} if dtype == torch.float64 else {"rtol": 1e-4, "atol_scale": 1e-6}


def assert_same(got, want, dtype=torch.float64):
    tol = tolerance(dtype)
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == torch.float32 and got[name].device.type == "cpu"
        scale = want[name].abs().max().item()
        torch.testing.assert_close(
            got[name], want[name], rtol=tol["rtol"], atol=tol["atol_scale"] * scale, msg=name
        )


class CountForwards:
    """Counts calls of a module's forward (forward hooks fire again when checkpointing recomputes)."""

    def __init__(self, module):
        self.count = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.count += 1

    def remove(self):
        self.handle.remove()


def enable_checkpointing(model):
    """transformers' activation checkpointing with the non-reentrant implementation, as ``unlearn`` does."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()  # what unlearn() turns on with checkpointing and frozen embeddings


# ---------------------------------------------------------------------------------------------------
# Groups


@pytest.mark.parametrize("mode", ["per_example", "batch"])
@pytest.mark.parametrize("per_group", [1, 2, 6])
def test_grouped_estimate_equals_one_pass(model, batches, mode, per_group):
    full = estimate_fisher(model, batches, target_modules=MLP, mode=mode, backend="torch", progress=False)
    forwards = CountForwards(model)
    try:
        grouped = estimate_fisher(
            model,
            batches,
            target_modules=MLP,
            mode=mode,
            backend="torch",
            max_memory=per_group * LAYER_BYTES,
            progress=False,
        )
    finally:
        forwards.remove()
    assert forwards.count == len(batches) * (6 // per_group)  # one pass per group of per_group layers
    assert (grouped.num_examples, grouped.num_tokens, grouped.mode) == (
        full.num_examples,
        full.num_tokens,
        mode,
    )
    assert_same(grouped, full.to("cpu"))


def test_uneven_groups_over_every_layer(model, batches):
    """All 14 layers (q, k, v, o, gate, up, down; 512 to 1536 weights) under a budget of one MLP layer."""
    full = estimate_fisher(model, batches, backend="torch", progress=False)
    sizes = {name: 4 * t.numel() for name, t in full.items()}
    groups = plan_groups(sizes, LAYER_BYTES, what="x")
    assert 7 < len(groups) < 14  # k and v (and q, o) share groups, the MLP layers do not
    forwards = CountForwards(model)
    try:
        grouped = estimate_fisher(model, batches, backend="torch", max_memory="6KiB", progress=False)
    finally:
        forwards.remove()
    assert forwards.count == len(batches) * len(groups)
    assert_same(grouped, full)
    want, _ = per_example_oracle(model, batches, list(full))
    for name in want:  # and both are the per-example Fisher (test_fisher.py's tolerance)
        torch.testing.assert_close(grouped[name].double(), want[name], rtol=1e-6, atol=0, msg=name)


def test_plan_groups():
    sizes = {"a": 4, "b": 4, "c": 8, "d": 2, "e": 2, "f": 8}
    assert plan_groups(sizes, 8, what="x") == [["a", "b"], ["c"], ["d", "e"], ["f"]]
    assert plan_groups(sizes, 10, what="x") == [["a", "b"], ["c", "d"], ["e", "f"]]
    assert plan_groups(sizes, 100, what="x") == [list(sizes)]
    with pytest.raises(ValueError, match=r"too small for layer 'c': its x need 8 B \(8 bytes\)"):
        plan_groups(sizes, 7, what="x")


def test_budget_too_small_is_refused_before_any_pass(model, batches, retain):
    forwards = CountForwards(model)
    try:
        with pytest.raises(
            ValueError,
            match=r"too small for layer 'model\.layers\.0\.mlp\.gate_proj': its fp32 accumulator need "
            r"6\.0 KiB \(6144 bytes\)",
        ):
            estimate_fisher(model, batches, target_modules=MLP, max_memory="6143", progress=False)
        with pytest.raises(
            ValueError,
            match=r"too small for layer 'model\.layers\.0\.mlp\.gate_proj': its fp32 forget and retain "
            r"accumulators need 12\.0 KiB \(12288 bytes\)",
        ):
            fila_row_weights(model, batches, retain, target_modules=MLP, max_memory="8KiB", progress=False)
        with pytest.raises(ValueError, match="invalid memory size '12 XB'"):
            fila_row_weights(model, batches, retain, max_memory="12 XB", progress=False)
    finally:
        forwards.remove()
    assert forwards.count == 0


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("64MiB", 64 * 2**20),
        ("2GB", 2 * 10**9),
        ("1.5 GiB", 3 * 2**29),
        ("512", 512),
        (" 10kib ", 10240),
        ("1b", 1),
        (4096, 4096),
    ],
)
def test_parse_bytes(text, size):
    assert parse_bytes(text) == size


@pytest.mark.parametrize("bad", ["", "abc", "12 XB", "-5MiB", "0", 0, -1, "0.1", "1e9", True, 1.5, None])
def test_parse_bytes_refuses(bad):
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes(bad)


# ---------------------------------------------------------------------------------------------------
# Checkpointing


@pytest.mark.parametrize("mode", ["per_example", "batch"])
def test_checkpointed_estimate_equals_plain(model, batches, mode):
    plain = estimate_fisher(model, batches, mode=mode, backend="torch", progress=False)
    checkpointed_model = copy.deepcopy(model)
    enable_checkpointing(checkpointed_model)
    probe = CountForwards(checkpointed_model.model.layers[0].self_attn.q_proj)
    try:
        got = estimate_fisher(checkpointed_model, batches, mode=mode, backend="torch", progress=False)
    finally:
        probe.remove()
    assert probe.count == 2 * len(batches)  # recomputed in the backward, yet counted once
    assert_same(got, plain.to("cpu"))
    # Grouped and checkpointed together.
    got = estimate_fisher(
        checkpointed_model, batches, mode=mode, backend="torch", max_memory="8KiB", progress=False
    )
    assert_same(got, plain.to("cpu"))


def test_checkpointing_is_the_callers_choice(model, batches):
    plain = estimate_fisher(model, batches, backend="torch", progress=False)
    layer = model.model.layers[0]
    probe = CountForwards(layer.self_attn.q_proj)
    try:
        got = estimate_fisher(model, batches, backend="torch", gradient_checkpointing=True, progress=False)
    finally:
        probe.remove()
    assert probe.count == 2 * len(batches)
    assert_same(got, plain.to("cpu"))
    assert not layer.gradient_checkpointing and "forward" not in layer.__dict__  # undone

    checkpointed_model = copy.deepcopy(model)
    enable_checkpointing(checkpointed_model)
    probe = CountForwards(checkpointed_model.model.layers[0].self_attn.q_proj)
    try:
        estimate_fisher(checkpointed_model, batches[:1], gradient_checkpointing=False, progress=False)
    finally:
        probe.remove()
    assert probe.count == 1
    assert all(layer.gradient_checkpointing for layer in checkpointed_model.model.layers)


def test_backward_stops_at_the_lowest_measured_layer(model, batches):
    """Only layer 1 measured: layer 0 stays out of the graph, so checkpointing never recomputes it, even
    with the input embeddings made to require grad (enable_input_require_grads)."""
    checkpointed_model = copy.deepcopy(model)
    enable_checkpointing(checkpointed_model)
    layers = checkpointed_model.model.layers
    below, above = CountForwards(layers[0].self_attn.q_proj), CountForwards(layers[1].self_attn.q_proj)
    names = [f"model.layers.1.{s}" for s in ("self_attn.v_proj", "mlp.up_proj")]
    try:
        got = estimate_fisher(
            checkpointed_model, batches, target_modules=names, backend="torch", progress=False
        )
    finally:
        below.remove()
        above.remove()
    assert below.count == len(batches) and above.count == 2 * len(batches)
    want, _ = per_example_oracle(model, batches, names)
    for name in names:
        torch.testing.assert_close(got[name].double(), want[name], rtol=1e-6, atol=0, msg=name)


def test_checkpointing_needs_checkpointable_layers(batches):
    with pytest.raises(ValueError, match="no checkpointable layers"):
        estimate_fisher(TwoLayerNet(), batches, gradient_checkpointing=True, progress=False)


class TwoLayerNet(nn.Module):
    """Embedding → ``a`` → (in place: ×2, tanh) → cumulative sum over tokens → ``b`` (twice if
    ``shared``) → head. The model's own code modifies ``a``'s output in place."""

    def __init__(self, hidden=16, shared=False):
        super().__init__()
        torch.manual_seed(7)
        self.embed = nn.Embedding(VOCAB, hidden)
        self.a = nn.Linear(hidden, hidden)
        self.b = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, VOCAB)
        self.shared = shared
        self.double()

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask=None):
        h = self.a(self.embed(input_ids))
        h.mul_(2.0).tanh_()
        h = self.b(torch.cumsum(h, dim=1))  # tokens mix: the per-example estimate is not the token one
        if self.shared:
            h = self.b(h)
        return SimpleNamespace(logits=self.head(h))


def test_in_place_use_of_a_measured_output(batches):
    net = TwoLayerNet()
    got = estimate_fisher(net, batches, backend="torch", progress=False)
    want, _ = per_example_oracle(net, batches, ["a", "b"])
    assert sorted(got) == ["a", "b"]
    for name in want:
        torch.testing.assert_close(got[name].double(), want[name], rtol=1e-6, atol=0, msg=name)


def test_shared_weights_are_refused(batches):
    with pytest.raises(ValueError, match=r"layer 'b' ran more than once in one forward pass"):
        estimate_fisher(TwoLayerNet(shared=True), batches, progress=False)


# ---------------------------------------------------------------------------------------------------
# Row weights


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["per_example", "batch"])
def test_streamed_row_weights_equal_those_of_whole_estimates(batches, retain, dtype, mode):
    model = fisher_llama(dtype)
    options = dict(mode=mode, backend="torch", progress=False)
    want = FilaRowWeights.from_fisher(
        estimate_fisher(model, batches, **options), estimate_fisher(model, retain, **options), eps=1e-5
    )
    forwards = CountForwards(model)
    try:
        got = fila_row_weights(model, batches, retain, max_memory=2 * 2 * LAYER_BYTES, **options)
    finally:
        forwards.remove()
    sizes = {name: 8 * layer.weight.numel() for name, layer in linear_layers(model).items() if name in want}
    groups = plan_groups(sizes, 2 * 2 * LAYER_BYTES, what="x")
    assert len(groups) == 5 and forwards.count == len(groups) * (len(batches) + len(retain))
    assert list(got) == list(want) and len(got) == 14
    assert got.eps == 1e-5 and got.mode == mode
    assert got.counts == {
        "forget_examples": 6,
        "forget_tokens": sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches),
        "retain_examples": 6,
        "retain_tokens": sum(int((b["labels"][:, 1:] != -100).sum()) for b in retain),
    }
    assert got.counts == want.counts and want.mode == mode
    assert_same(got, want, dtype)
    checkpointed = copy.deepcopy(model)
    enable_checkpointing(checkpointed)
    assert_same(fila_row_weights(checkpointed, batches, retain, **options), want, dtype)


def wrap(base, **lora):
    from peft import LoraConfig, get_peft_model

    options = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **lora}
    return get_peft_model(copy.deepcopy(base), LoraConfig(**options))


def test_fila_from_streamed_row_weights_equals_fila_from_estimates(batches, retain):
    base = fisher_llama(torch.float32, seed=3)
    options = dict(backend="torch", progress=False)
    from_estimates = fila_init(
        wrap(base), estimate_fisher(base, batches, **options), estimate_fisher(base, retain, **options)
    )
    model = wrap(base)
    # Measured on the wrapped model, as unlearn() does: the LoRA layers' frozen base weights.
    row_weights = fila_row_weights(model, batches, retain, max_memory="24KiB", **options)
    fila_init(model, row_weights=row_weights)
    want, got = lora_layers(from_estimates), lora_layers(model)
    assert list(got) == list(want) and len(got) == 14
    for name, (_, layer) in got.items():
        ref = want[name][1]
        s = layer.scaling["default"]
        product = s * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        ref_product = s * ref.lora_B["default"].weight @ ref.lora_A["default"].weight
        scale = ref_product.abs().max().item()
        torch.testing.assert_close(product, ref_product, rtol=1e-4, atol=1e-4 * scale, msg=name)
        torch.testing.assert_close(
            layer.get_base_layer().weight, ref.get_base_layer().weight, rtol=1e-4, atol=1e-4 * scale, msg=name
        )


def test_row_weights_file(tmp_path, model, batches, retain):
    weights = fila_row_weights(model, batches, retain, target_modules=["v_proj"], eps=1e-3, progress=False)
    path = tmp_path / "d.safetensors"
    weights.save(path)
    loaded = FilaRowWeights.load(path)
    assert (loaded.eps, loaded.mode, loaded.counts) == (1e-3, "per_example", weights.counts)
    assert list(loaded) == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    for name in weights:
        assert torch.equal(loaded[name], weights[name]) and loaded[name].shape == (16,)
    assert torch.equal(
        loaded["base_model.model.model.layers.0.self_attn.v_proj.base_layer"],
        weights["model.layers.0.self_attn.v_proj"],
    )
    with pytest.raises(FileExistsError, match="overwrite=True"):
        weights.save(path)
    weights.save(path, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["d.safetensors"]  # no temporary left behind
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a fastunlearn FILA row-weights file"):
        FilaRowWeights.load(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="no FILA row-weights at"):
        FilaRowWeights.load(tmp_path / "missing.safetensors")


def test_fila_init_with_row_weights_refuses_bad_input(batches, retain):
    base = fisher_llama(torch.float32, seed=3)
    forget_fisher = estimate_fisher(base, batches, progress=False)
    retain_fisher = estimate_fisher(base, retain, progress=False)
    row_weights = FilaRowWeights.from_fisher(forget_fisher, retain_fisher, eps=1e-4)
    with pytest.raises(ValueError, match="needs the forget and retain Fisher estimates, or row_weights="):
        fila_init(wrap(base), forget_fisher)
    with pytest.raises(ValueError, match="not both"):
        fila_init(wrap(base), forget_fisher, retain_fisher, row_weights=row_weights)
    with pytest.raises(ValueError, match=r"computed with eps=0\.0001; fila_init got eps=1e-05"):
        fila_init(wrap(base), row_weights=row_weights, eps=1e-5)
    partial = {k: v for k, v in row_weights.items() if "down_proj" not in k}
    with pytest.raises(ValueError, match=r"row weights has no entry for 2 LoRA layer.*down_proj"):
        fila_init(wrap(base), row_weights=partial)
    name = "model.layers.1.mlp.up_proj"
    for bad, message in (
        (torch.ones(47), r"shape \(47,\), expected \(48,\)"),
        (torch.full((48,), float("nan")), "non-finite"),
        (-torch.ones(48), "negative"),
    ):
        corrupt = dict(row_weights.items())
        corrupt[name] = bad
        model = wrap(base)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match=message):
            fila_init(model, row_weights=corrupt)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # left intact
    with pytest.raises(TypeError, match="1-D floating-point"):
        fila_init(wrap(base), row_weights={name: torch.ones(48, 32)})
    # The row weights of two estimates give exactly fila_init(forget, retain)'s factors.
    one = fila_init(wrap(base), forget_fisher, retain_fisher, eps=1e-4)
    two = fila_init(wrap(base), row_weights=row_weights)
    for (k1, v1), (k2, v2) in zip(one.state_dict().items(), two.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1


# ---------------------------------------------------------------------------------------------------
# The estimate streamed into its file (fastunlearn fisher)


def read_file(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}, handle.metadata()  # noqa: SIM118


@pytest.mark.parametrize("per_group", [None, 2])  # one group; 7 groups of ≤ 2 MLP-sized layers
def test_streamed_file_is_the_saved_estimate(tmp_path, model, batches, per_group):
    budget = None if per_group is None else per_group * LAYER_BYTES
    options = dict(mode="batch", backend="torch", max_memory=budget, progress=False)
    estimate = estimate_fisher(model, batches, **options)
    estimate.save(tmp_path / "saved.safetensors")
    written = save_fisher(model, batches, tmp_path / "streamed.safetensors", **options)

    saved, saved_meta = read_file(tmp_path / "saved.safetensors")
    streamed, streamed_meta = read_file(tmp_path / "streamed.safetensors")
    assert streamed_meta == saved_meta
    assert set(streamed) == set(saved) == set(written.shapes)
    for name in saved:
        # the same passes over the same groups: equal to the bit, dtype and shape included
        assert streamed[name].dtype == saved[name].dtype == torch.float32
        assert torch.equal(streamed[name], saved[name]), name
        assert tuple(streamed[name].shape) == written.shapes[name]
    loaded = FisherEstimate.load(tmp_path / "streamed.safetensors")
    assert (loaded.num_examples, loaded.num_tokens, loaded.mode) == (
        estimate.num_examples,
        estimate.num_tokens,
        "batch",
    )
    assert (written.num_examples, written.num_tokens) == (estimate.num_examples, estimate.num_tokens)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved.safetensors", "streamed.safetensors"]


def test_finished_groups_are_on_disk_before_the_next_pass(tmp_path, model, batches):
    """Each pass starts with every earlier group's layers written: the estimate is never held whole."""
    layers = select_linear_layers(model, None)  # what an estimate covers: not the output head
    budget = 3 * LAYER_BYTES
    header = None
    seen = []  # at the first forward of each pass: bytes of data in the temporary file

    def on_forward(module, args, output):
        nonlocal header
        (tmp,) = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        size = tmp.stat().st_size
        if header is None:
            header = size  # written before the first pass
        if not seen or size - header != seen[-1]:
            seen.append(size - header)

    handle = model.register_forward_hook(on_forward)
    try:
        save_fisher(model, batches, tmp_path / "f.safetensors", backend="torch", max_memory=budget,
                    progress=False)  # fmt: skip
    finally:
        handle.remove()
    groups = plan_groups({n: 4 * m.weight.numel() for n, m in layers.items()}, budget, what="x")
    assert len(groups) > 2
    done, expected = 0, []
    for group in groups:
        expected.append(done)
        done += sum(4 * layers[n].weight.numel() for n in group)
    assert seen == expected
    assert (tmp_path / "f.safetensors").stat().st_size == header + done


def test_a_non_finite_layer_leaves_nothing(tmp_path, batches):
    model = fisher_llama(seed=2)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    target = tmp_path / "f.safetensors"
    with pytest.raises(ValueError, match="non-finite"):
        save_fisher(model, batches, target, backend="torch", max_memory=LAYER_BYTES, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary


def test_fisher_file_refuses_what_its_header_does_not_say(tmp_path):
    shapes = {"a": (2, 3), "b": (4,)}
    fisher_file = FisherFile(shapes, num_examples=3, num_tokens=7, mode="per_example")
    good = [("a", torch.rand(2, 3)), ("b", torch.rand(4))]
    with pytest.raises(ValueError, match=r"layer 'b' \(4,\) where the file's header has 'a' \(2, 3\)"):
        fisher_file.write(tmp_path / "f", good[::-1])
    with pytest.raises(ValueError, match=r"layer 'a' \(3, 2\)"):
        fisher_file.write(tmp_path / "f", [("a", torch.rand(3, 2)), good[1]])
    with pytest.raises(ValueError, match=r"lacks 1 layer\(s\): \['b'\]"):
        fisher_file.write(tmp_path / "f", good[:1])
    with pytest.raises(ValueError, match=r"layer 'c'"):
        fisher_file.write(tmp_path / "f", [*good, ("c", torch.rand(1))])
    assert list(tmp_path.iterdir()) == []
    fisher_file.write(tmp_path / "f", good)
    with pytest.raises(FileExistsError):
        fisher_file.write(tmp_path / "f", good)
    tensors, metadata = read_file(tmp_path / "f")
    assert all(torch.equal(tensors[name], t) for name, t in good)
    assert metadata["num_examples"] == "3" and metadata["num_tokens"] == "7"
