"""The fused operations as PyTorch custom operators (``torch.ops.fastunlearn.*``).

Checked: every operator passes ``torch.library.opcheck`` (schema, autograd registration, fake
implementation against the real one, AOT dispatch with dynamic shapes); the public functions run under
``FakeTensorMode`` with the outputs and gradients (shape, dtype) a real run gives; a live-bytes tracker
under ``FakeTensorMode`` (PyTorch's ``MemTracker``) sees the peak the real operators reach, their
workspace included; ``torch.compile`` traces the losses (a patched model's included) as graph nodes and
gives the eager loss and gradients.

The real peak is the profiler's count of live tensor bytes (``fastunlearn.plan.peak_memory``). It and the
tracker's differ by the bookkeeping of small tensors (scalars, a gradient counted when autograd hands it
over), a few kB here against peaks of megabytes: 5 % is the tolerance, and each case's workspace is
larger than that, so a fake implementation that left it out would fail.
"""

from __future__ import annotations

import pytest
import torch
from helpers.models import tiny_llama
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.library import opcheck

import fastunlearn
from fastunlearn import (
    dpo_loss,
    fused_linear_ihl_loss,
    fused_linear_kl_loss,
    fused_linear_nll_loss,
    ihl_loss,
    kl_loss,
    nll_loss,
    npo_loss,
    per_example_grad_sq,
    rmu_loss,
    sequence_logprobs,
    simnpo_loss,
)
from fastunlearn.ops import _ihl_torch
from fastunlearn.ops.fused_linear import fused_linear_row_loss
from fastunlearn.ops.ihl import row_loss
from fastunlearn.plan.peak_memory import peak_tensor_bytes

BACKENDS = ["torch", "triton"]
OPS = torch.ops.fastunlearn


def metadata(*tensors: torch.Tensor | None) -> list:
    return [None if t is None else (tuple(t.shape), t.dtype) for t in tensors]


def in_both_modes(make, run) -> tuple[list, list]:
    """``run(*make())`` on real tensors and under ``FakeTensorMode``: the metadata of each result."""
    real = run(*make())
    with FakeTensorMode():
        fake = run(*make())
    return real, fake


def row_problem(dtype=torch.bfloat16, shape=(2, 5, 37)):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(shape, generator=gen).to(dtype).requires_grad_()
    labels = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    labels[0, :2] = -100
    return logits, labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("loss_fn", [ihl_loss, nll_loss], ids=["ihl", "nll"])
def test_row_losses_under_fake_tensor_mode(loss_fn, reduction, backend):
    def run(logits, labels):
        loss = loss_fn(logits, labels, reduction=reduction, backend=backend)  # validate: no values to read
        loss.sum().backward()
        return metadata(loss, logits.grad)

    real, fake = in_both_modes(row_problem, run)
    assert fake == real


def head_problem(dtype=torch.bfloat16, n=(3, 7), hidden=16, vocab=41):
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(*n, hidden, generator=gen).to(dtype).requires_grad_()
    w = torch.randn(vocab, hidden, generator=gen).to(dtype).requires_grad_()
    b = torch.randn(vocab, generator=gen).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, n, generator=gen)
    labels.view(-1)[:3] = -100
    return h, w, b, labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("loss_fn", [fused_linear_ihl_loss, fused_linear_nll_loss], ids=["ihl", "nll"])
def test_fused_linear_losses_under_fake_tensor_mode(loss_fn, reduction, backend):
    def run(h, w, b, labels):
        loss = loss_fn(h, w, labels, bias=b, reduction=reduction, backend=backend, chunk_rows=4)
        loss.sum().backward()
        return metadata(loss, h.grad, w.grad, b.grad)

    real, fake = in_both_modes(head_problem, run)
    assert fake == real


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masked", [False, True])
def test_kl_losses_under_fake_tensor_mode(backend, masked):
    def run_logits(h, w, b, labels):
        mask = labels != -100 if masked else None
        logits, ref = h @ w.t(), (h @ w.t()).detach() + 1
        loss = kl_loss(logits, ref, mask, backend=backend)
        loss.backward()
        return metadata(loss, h.grad, w.grad)

    def run_fused(h, w, b, labels):
        mask = labels != -100 if masked else None
        loss = fused_linear_kl_loss(h, h.detach() * 0.5, w, mask, b, backend=backend, chunk_rows=4)
        loss.backward()
        return metadata(loss, h.grad, w.grad, b.grad)

    for run in (run_logits, run_fused):
        real, fake = in_both_modes(head_problem, run)
        assert fake == real


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_losses_under_fake_tensor_mode(backend):
    def run(logits, labels):
        logp, counts = sequence_logprobs(logits, labels, backend=backend)
        ref = logp.detach() - 1
        loss = npo_loss(logp, ref) + simnpo_loss(logp, counts) + dpo_loss(logp, ref, logp.flip(0), ref)
        hidden = logits[..., :8]
        loss = loss + rmu_loss(hidden, hidden.detach() + 1, labels != -100)
        loss.backward()
        return metadata(logp, counts, loss, logits.grad)

    real, fake = in_both_modes(row_problem, run)
    assert fake == real


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tokens", [1, 9])
def test_grad_sq_under_fake_tensor_mode(backend, tokens):
    def make():
        gen = torch.Generator().manual_seed(2)
        return torch.randn(3, tokens, 20, generator=gen), torch.randn(3, tokens, 18, generator=gen)

    def run(x, g):
        out = torch.zeros(18, 20)
        return metadata(
            per_example_grad_sq(x, g, backend=backend), per_example_grad_sq(x, g, out, backend=backend)
        )

    real, fake = in_both_modes(make, run)
    assert fake == real


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["ihl", "nll"])
def test_opcheck_row_loss_operators(backend, loss):
    logits, labels = row_problem(torch.float32, (1, 6, 37))
    flat = labels.reshape(-1)
    opcheck(OPS.row_loss.default, (logits, flat, loss, -100, backend, False))
    _, stats, argmax = row_loss(logits.detach(), flat, loss, -100, backend, False)
    grad_rows = torch.rand(6) + 0.5
    args = (labels.reshape(-1), stats, argmax, grad_rows, -100, backend)
    opcheck(OPS.row_loss_backward.default, (logits.detach(), *args))
    opcheck(OPS.row_loss_backward_.default, (logits.detach().clone(), *args))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck_fused_linear_operators(backend, reduction):
    h, w, b, labels = head_problem(torch.float32, (9,))
    needs = [reduction != "none"] * 3  # as the losses pass them: per-token gradients form in the backward
    opcheck(OPS.fused_linear_row_loss.default, (h, w, b, labels, "ihl", -100, reduction, backend, 4, needs))
    if reduction == "none":
        _, stats, argmax, *_ = fused_linear_row_loss(
            h.detach(), w.detach(), b.detach(), labels, "ihl", -100, "none", backend, 4, [False] * 3
        )
        grad_rows = torch.rand(9) + 0.5
        args = (grad_rows, h.detach(), w.detach(), b.detach(), labels, stats, argmax, -100, backend, 4)
        opcheck(OPS.fused_linear_row_loss_backward.default, (*args, [True, False, True]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_kl_operators(backend):
    h, w, b, labels = head_problem(torch.float32, (9,))
    z = (h @ w.t()).detach().requires_grad_()
    r, weights = z.detach() + torch.randn(9, 41), (labels != -100).float() / 6
    opcheck(OPS.kl_rows.default, (z, r, weights, backend))
    opcheck(OPS.kl_rows.default, (z, r, None, backend))
    _, lse = OPS.kl_rows(z.detach(), r, weights, backend)
    opcheck(OPS.kl_rows_backward.default, (z.detach(), r, lse, torch.rand(9), backend))
    opcheck(OPS.fused_linear_kl.default, (h, h.detach() + 0.1, w, b, weights, backend, 4, [True] * 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_grad_sq_operator(backend):
    gen = torch.Generator().manual_seed(3)
    x, g = torch.randn(2, 5, 20, generator=gen), torch.randn(2, 5, 18, generator=gen)
    opcheck(OPS.per_example_grad_sq.default, (x, g, torch.rand(18, 20), backend, True))


def fake_peak(make, run) -> int:
    """Peak bytes MemTracker sees while ``run(*make())`` runs on fake tensors made beforehand."""
    from torch.distributed._tools.mem_tracker import MemTracker

    with FakeTensorMode():
        args = make()
        tracker = MemTracker()
        with tracker:
            run(*args)
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="MemTracker needs torch.distributed")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_a_tracker_under_fake_tensor_mode_sees_the_fused_workspace(monkeypatch, reduction):
    """The fused loss's chunk of logits (2.6 MB here) lives inside the operator; its fake implementation
    reports it, so the fake peak is the real one. The PyTorch row path's blocks, which the fake
    implementations do not report, are made negligible (4 kB)."""
    monkeypatch.setattr(_ihl_torch, "CPU_BLOCK_ELEMENTS", 1024)
    chunk_rows, vocab = 128, 5003

    def make():
        gen = torch.Generator().manual_seed(4)
        h = torch.randn(300, 64, generator=gen).requires_grad_()
        w = torch.randn(vocab, 64, generator=gen).requires_grad_()
        return h, w, torch.randint(0, vocab, (300,), generator=gen)

    def run(h, w, labels):
        loss = fused_linear_nll_loss(
            h, w, labels, reduction=reduction, backend="torch", chunk_rows=chunk_rows
        )
        loss.sum().backward()

    args = make()
    real = peak_tensor_bytes(lambda: run(*args))
    fake = fake_peak(make, run)
    assert abs(fake - real) <= 0.05 * real
    assert chunk_rows * vocab * 4 > 0.05 * real  # the workspace: leaving it out would fail the check


@pytest.mark.skipif(not torch.distributed.is_available(), reason="MemTracker needs torch.distributed")
def test_a_tracker_under_fake_tensor_mode_sees_the_fused_kl_workspace(monkeypatch):
    """Two chunks of logits (one per model, 2.6 MB each) inside the operator: reported by its fake."""
    monkeypatch.setattr(_ihl_torch, "CPU_BLOCK_ELEMENTS", 1024)  # the PyTorch KL path's blocks
    chunk_rows, vocab = 128, 5003

    def make():
        gen = torch.Generator().manual_seed(7)
        h = torch.randn(300, 64, generator=gen).requires_grad_()
        return h, h.detach() + 0.1, torch.randn(vocab, 64, generator=gen).requires_grad_()

    def run(h, ref_h, w):
        fused_linear_kl_loss(h, ref_h, w, backend="torch", chunk_rows=chunk_rows).backward()

    args = make()
    real, fake = peak_tensor_bytes(lambda: run(*args)), fake_peak(make, run)
    assert abs(fake - real) <= 0.05 * real
    assert 0.05 * real < chunk_rows * vocab * 4


@pytest.mark.skipif(not torch.distributed.is_available(), reason="MemTracker needs torch.distributed")
def test_a_tracker_under_fake_tensor_mode_sees_the_grad_sq_workspace():
    """The PyTorch path's per-example gradient chunk and bf16→fp32 operand copies (its workspace)."""

    def make():
        gen = torch.Generator().manual_seed(5)
        x = torch.randn(6, 33, 96, generator=gen).bfloat16()
        return x, torch.randn(6, 33, 80, generator=gen).bfloat16()

    def run(x, g):
        per_example_grad_sq(x, g, backend="torch")

    args = make()
    real, fake = peak_tensor_bytes(lambda: run(*args)), fake_peak(make, run)
    assert abs(fake - real) <= 0.05 * real
    assert 0.05 * real < 6 * 80 * 96 * 4  # the chunk of per-example gradients alone


def test_compiled_losses_are_one_graph():
    """With ``validate=False`` (the label check reads values: a graph break) a function of every loss
    compiles to one graph, and gives the eager value and gradients."""
    h, w, _, labels = head_problem(torch.float32, (2, 5))
    logits = (h @ w.t()).detach().requires_grad_()

    def step(z, y, h, w):
        logp, counts = sequence_logprobs(z, y, validate=False)
        return (
            ihl_loss(z * 2.0, y, validate=False)
            + nll_loss(z, y, validate=False)
            + kl_loss(z, z.detach() + 1)
            + fused_linear_nll_loss(h, w, y, validate=False, chunk_rows=4)
            + fused_linear_kl_loss(h, h.detach() * 2, w, chunk_rows=4)
            + npo_loss(logp, logp.detach() - 1)
            + simnpo_loss(logp, counts)
        )

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    copies = [t.detach().clone().requires_grad_() for t in (logits, h, w)]
    step(logits, labels, h, w).backward()
    compiled(copies[0], labels, *copies[1:]).backward()
    for got, want in zip(copies, (logits, h, w)):
        torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=0)


def test_compiled_patched_model_step_gives_the_eager_loss_and_gradients():
    """``torch.compile`` of a patched model's loss step: the fused IHL operator is a node of a compiled
    graph (the model's own code graph-breaks where the patch swaps the head's forward), and the loss
    and every parameter gradient equal eager's (the same operators on the same inputs)."""
    from torch._dynamo.backends.debugging import aot_eager

    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    model = fastunlearn.patch(tiny_llama(131, seed=3, attn_implementation="eager"), validate=False)
    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(3, 131, (2, 9), generator=gen)
    labels = ids.masked_fill(torch.arange(9) < 3, -100)

    def step(m):
        loss = m(input_ids=ids, labels=labels, loss_type="ihl").loss
        loss.backward(torch.tensor(0.7))
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    want_loss, want_grads = step(model)
    got_loss, got_grads = step(torch.compile(model, backend=recording))
    nodes = [str(node.target) for gm in graphs for node in gm.graph.nodes]
    assert "fastunlearn.fused_linear_row_loss.default" in nodes
    torch.testing.assert_close(got_loss, want_loss, rtol=0, atol=0)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-6, atol=1e-7, msg=name)
