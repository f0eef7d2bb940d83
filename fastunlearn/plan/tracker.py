"""Live tensor bytes of code running on fake tensors, by kind and phase: the measuring half of the plan.

:class:`LiveTensors` is a ``TorchDispatchMode`` meant to run above PyTorch's ``FakeTensorMode``
(tensors with shapes, dtypes and storages but no data). Every operator's outputs pass through it; a
storage none of the operator's inputs held is a new allocation, counted with its size until the
storage object is garbage-collected (a ``weakref`` finalizer), which is when the allocator would get
it back. So the count is the live tensor bytes of the code as it runs, operator by operator — what
``torch.cuda.memory_allocated`` reports — and a phase's peak is its high-water mark. Scratch memory an
operator allocates and frees inside itself is not seen (a custom operator with a fake implementation
can make it visible by returning a view of its workspace).

Each allocation gets a kind (:data:`KINDS`): the one the caller declares (:meth:`LiveTensors.allocating`);
in the backward, the kind the forward tagged on the autograd node running it, or the kind registered for
that node's ``autograd.Function``; at the output head, ``"loss"`` (:meth:`LiveTensors.watch_head`). The
gradients of trainable parameters are claimed as ``"trainable"`` when autograd accumulates them.

Fake tensors have no values, so the few places that read one get an answer: an ``all()`` is true and
any other read is false or zero (checks pass; the truncated SVD converges at its first test), and
``nonzero`` finds every element non-zero (every token labelled: an upper bound).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["KINDS", "LiveTensors", "PhasePeak"]

KINDS = {
    "weights": "weights (frozen)",
    "trainable": "trainable parameters and their gradients",
    "optimizer": "optimiser moments and step",
    "activations": "activations",
    "loss": "loss and metrics at the output head",
    "fisher": "Fisher accumulators",
    "solver": "FILA solver workspace",
    "host": "copies to the host",
}
_TAG = "fastunlearn.plan.kind"
_aten = torch.ops.aten
_DEVICE = torch.ops.prim.device.default
# What a read of these operators' results gets: every element true, every element counted.
_READS = {
    _aten.all.default: lambda t: True,
    _aten.all.dim: lambda t: True,
    _aten.sum.default: lambda t: t.numel(),
}


@dataclass
class PhasePeak:
    """A phase's largest live bytes, split by kind, and the step of the phase where it occurred."""

    name: str
    peak: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    step: str = ""


class LiveTensors(TorchDispatchMode):
    """Counts live tensor bytes by kind while active (module docstring); peaks per phase."""

    def __init__(self, fake_mode: FakeTensorMode | None = None, *, host_counts: bool = True) -> None:
        super().__init__()
        # FakeTensorMode remembers each fake tensor it makes by a weak reference, and nn.Module.to
        # cannot swap a parameter holding one: the memo is emptied after every operator (it maps
        # real tensors to their fakes, and there are none here).
        self._memo = fake_mode.fake_tensor_converter.tensor_memo if fake_mode is not None else {}
        self._fake = fake_mode is not None
        # Copies to the host are the device's memory on a CPU run, not on a GPU's.
        self.counted = set(KINDS) - (set() if host_counts else {"host"})
        self.live = dict.fromkeys(KINDS, 0)
        self.total = 0
        self.phases: list[PhasePeak] = []
        self.node_kinds: dict[type, str] = {}
        self._storages: dict[int, tuple[int, str]] = {}
        self._kind = "activations"
        self._at_head = False
        self._step = ""
        self._answers = WeakIdKeyDictionary()  # tensor -> the value a read of it gets
        self._current: PhasePeak | None = None

    # -- what the caller declares ---------------------------------------------------------------

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Record the peak of the block as phase ``name`` (a phase may be entered more than once)."""
        found = [p for p in self.phases if p.name == name]
        record = found[0] if found else PhasePeak(name)
        if not found:
            self.phases.append(record)
        outer, self._current = self._current, record
        self._note_peak()
        try:
            yield
        finally:
            self._current = outer

    @contextlib.contextmanager
    def allocating(self, kind: str, step: str | None = None) -> Iterator[None]:
        """Tensors allocated in the block (outside a backward) are of ``kind``; ``step`` names the
        block in the phase's peak."""
        saved = self._kind, self._step, self._at_head
        self._kind, self._at_head = kind, False
        self._step = step if step is not None else self._step
        try:
            yield
        finally:
            self._kind, self._step, self._at_head = saved

    def claim(self, tensor: Tensor, kind: str, nbytes: int | None = None) -> None:
        """Count ``tensor``'s storage as ``kind`` from now on (a gradient once accumulated), and as
        ``nbytes`` if given (a weight stored quantised)."""
        key = tensor.untyped_storage()._cdata
        if key in self._storages:
            size = self._storages[key][0] if nbytes is None else nbytes
            self._free(key)
            self._storages[key] = (size, kind)
            self.live[kind] += size
            self.total += size if kind in self.counted else 0

    def restart_peak(self) -> None:
        """The current phase's peak is what is live now (a model built whole, then stored quantised)."""
        self._current.peak = 0
        self._note_peak()

    def watch_head(self, lm: nn.Module) -> None:
        """From a call of the causal LM ``lm``'s output head to the next call of ``lm``, allocations
        are of kind ``"loss"``, and so is the backward of what they compute."""

        def at_head(*_: object) -> None:
            self._at_head = True

        def leave(*_: object) -> None:
            self._at_head = False

        lm.get_output_embeddings().register_forward_pre_hook(at_head)
        lm.register_forward_pre_hook(leave)

    def count_gradients(self, params: list[nn.Parameter]) -> None:
        """Claim each parameter's gradient as ``"trainable"`` when autograd accumulates it."""
        for p in params:
            p.register_post_accumulate_grad_hook(lambda p: self.claim(p.grad, "trainable"))

    # -- the dispatch ---------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _DEVICE:  # the most frequent call by far: answered without the fake mode's dispatch
            device = getattr(args[0], "fake_device", None)
            return device if device is not None else func(*args, **kwargs)
        if self._fake and func is _aten._local_scalar_dense.default and getattr(args[0], "constant", None) is None:
            return self._answer(args[0])
        if self._fake and func is _aten.nonzero.default:  # every element non-zero: the upper bound
            (t,) = args
            out = torch.empty((t.numel(), t.dim()), dtype=torch.long, device=t.device)
        else:
            out = func(*args, **kwargs)
        if self._memo:
            self._memo.clear()
        if func in _READS:
            self._answers[out] = _READS[func](args[0])
        kind = None
        for t in tree_leaves(out):
            # A storage not counted yet is new: every tensor of the run is made under the counter.
            if isinstance(t, Tensor) and t.untyped_storage()._cdata not in self._storages:
                kind = kind or self._kind_now(func, args, kwargs)
                self._add(t, kind)
        if kind == "loss" and self._at_head:
            for t in tree_leaves(out):
                if isinstance(t, Tensor) and t.grad_fn is not None:
                    t.grad_fn.metadata[_TAG] = "loss"
        return out

    def _kind_now(self, func, args, kwargs) -> str:
        node = torch._C._current_autograd_node()
        if node is not None:
            tagged = node.metadata.get(_TAG)
            return tagged or self.node_kinds.get(getattr(node, "_forward_cls", None), "activations")
        if func is _aten._to_copy.default and kwargs.get("device") is not None:
            if kwargs.get("dtype") in (None, args[0].dtype):  # a transfer, not a cast
                return "host"
        if self._at_head and self._kind == "activations":
            return "loss"
        return self._kind

    def _answer(self, t: Tensor) -> bool | int | float:
        if t in self._answers:
            return self._answers[t]
        return False if t.dtype == torch.bool else (0.0 if t.is_floating_point() else 0)

    def _add(self, t: Tensor, kind: str) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._storages:
            return
        size = storage.nbytes()
        self._storages[key] = (size, kind)
        self.live[kind] += size
        self.total += size if kind in self.counted else 0
        weakref.finalize(storage, self._free, key)
        self._note_peak()

    def _free(self, key: int) -> None:
        size, kind = self._storages.pop(key)
        self.live[kind] -= size
        self.total -= size if kind in self.counted else 0

    def _note_peak(self) -> None:
        record = self._current
        if record is not None and self.total > record.peak:
            record.peak = self.total
            record.kinds = {k: v for k, v in self.live.items() if v and k in self.counted}
            record.step = self._step
