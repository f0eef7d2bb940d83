"""Peak bytes of live tensors, measured on real tensors (:func:`step_peaks`) or counted by kind on fake
ones (:class:`LiveTensors`: what the memory plan predicts).

Measured: CUDA's ``max_memory_allocated`` above the start; on the CPU the profiler's allocation and free
events in time order (exact, whatever the allocator caches; MKL's or oneDNN's own memory is not seen).
Dead tensors are collected first, so earlier garbage is not freed inside the window.

Counted: a storage the dispatch mode has not seen is a new allocation, live until the storage object is
collected (a ``weakref`` finalizer): ``memory_allocated`` operator by operator, scratch freed inside an
operator unseen. An allocation's kind is the caller's, in the backward the one tagged on (or registered
for) its autograd node, ``"loss"`` from the output head on; gradients are ``"trainable"``. Fake tensors
have no values, so reads get answers: ``all()`` is true, ``sum()`` counts the elements, any other read is
zero, and ``nonzero`` finds every element non-zero (every token labelled: an upper bound).
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary


@contextlib.contextmanager
def young_garbage() -> Iterator[None]:
    """Within the block ``gc.collect()`` scans only objects made in it: cheap, and earlier garbage is not
    freed inside a measurement."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def peak_tensor_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes of tensors ``fn()`` allocates on ``device`` above what is live when it starts."""
    return step_peaks([fn], device)[0]


def step_peaks(steps: Iterable[Callable[[], object]], device: torch.device | str = "cpu") -> list[int]:
    """The peak of live tensor bytes on ``device`` during each of ``steps``, run in turn, above what was
    live when the first started."""
    device = torch.device(device)
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"peak_tensor_bytes measures CUDA or CPU tensors, not {device.type!r}")
    with young_garbage():
        return _cuda_peaks(steps, device) if device.type == "cuda" else _cpu_peaks(steps)


def _cuda_peaks(steps: Iterable[Callable[[], object]], device: torch.device) -> list[int]:
    torch.cuda.empty_cache()
    torch.cuda.synchronize(device)
    start, peaks = torch.cuda.memory_allocated(device), []
    for step in steps:
        torch.cuda.reset_peak_memory_stats(device)
        step()
        gc.collect()
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - start)
    return peaks


def _cpu_peaks(steps: Iterable[Callable[[], object]]) -> list[int]:
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for index, step in enumerate(steps):
            with record_function(f"step {index}"):
                step()
                gc.collect()
    events = list(prof.profiler.kineto_results.events())
    ends = sorted(e.end_ns() for e in events if e.name().startswith("step "))
    memory = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    peaks, live, index = [0] * len(ends), 0, 0
    for event in memory:
        while index < len(ends) - 1 and event.start_ns() > ends[index]:
            index += 1
            peaks[index] = live  # what the step starts with
        live += event.nbytes()
        peaks[index] = max(peaks[index], live)
    for later in range(index + 1, len(ends)):  # steps that allocated nothing
        peaks[later] = live
    return peaks


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
_READS = {_aten.all.default: lambda t: True, _aten.all.dim: lambda t: True, _aten.sum.default: torch.numel}


@dataclass
class PhasePeak:
    """A phase's largest live bytes, split by kind, and the step of the phase where it occurred."""

    name: str
    peak_bytes: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    step: str = ""


class LiveTensors(TorchDispatchMode):
    """Counts the live tensor bytes of the fake run of ``fake_mode`` by kind, and each phase's peak;
    ``host_counts``: copies to the host are the device's memory (a CPU run)."""

    def __init__(self, fake_mode: FakeTensorMode, *, host_counts: bool = True) -> None:
        super().__init__()
        # FakeTensorMode's memo of real tensors (there are none) would keep nn.Module.to from swapping
        # parameters: emptied after every operator.
        self._memo = fake_mode.fake_tensor_converter.tensor_memo
        self.counted = set(KINDS) - (set() if host_counts else {"host"})
        self.live = dict.fromkeys(KINDS, 0)
        self.total = 0
        self.phases: list[PhasePeak] = []
        self.node_kinds: dict[type, str] = {}
        self._storages: dict[int, tuple[int, str]] = {}
        self._kind, self._step, self._at_head = "activations", "", False
        self._answers = WeakIdKeyDictionary()  # tensor -> what a read of it gets
        self._current: PhasePeak | None = None

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Record the block's peak as phase ``name``'s (a phase may be entered more than once)."""
        found = [p for p in self.phases if p.name == name]
        if not found:
            self.phases.append(PhasePeak(name))
        outer, self._current = self._current, (found or self.phases[-1:])[0]
        self._note_peak()
        try:
            yield
        finally:
            self._current = outer

    @contextlib.contextmanager
    def allocating(self, kind: str, step: str) -> Iterator[None]:
        """Tensors allocated in the block (outside a backward) are of ``kind``; ``step`` names it."""
        saved = self._kind, self._step, self._at_head
        self._kind, self._step, self._at_head = kind, step, False
        try:
            yield
        finally:
            self._kind, self._step, self._at_head = saved

    def claim(self, tensor: Tensor, kind: str, nbytes: int | None = None) -> None:
        """Count ``tensor``'s storage as ``kind`` from now on, and as ``nbytes`` if given."""
        key = tensor.untyped_storage()._cdata
        if key in self._storages:
            size = self._storages[key][0] if nbytes is None else nbytes
            self._free(key)
            self._count(key, size, kind)

    def restart_peak(self) -> None:
        """The current phase's peak is what is live now (a model built whole, then stored quantised)."""
        self._current.peak_bytes = 0
        self._note_peak()

    def watch_head(self, lm: nn.Module) -> None:
        """From ``lm``'s output head to its next call, allocations (and their backward) are ``"loss"``."""
        lm.get_output_embeddings().register_forward_pre_hook(lambda *_: setattr(self, "_at_head", True))
        lm.register_forward_pre_hook(lambda *_: setattr(self, "_at_head", False))

    def count_gradients(self, params: list[nn.Parameter]) -> None:
        """Claim each parameter's gradient as ``"trainable"`` when autograd accumulates it."""
        for p in params:
            p.register_post_accumulate_grad_hook(lambda p: self.claim(p.grad, "trainable"))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _DEVICE:  # by far the most frequent call: answered without the fake mode's dispatch
            return args[0].fake_device
        if func is _aten._local_scalar_dense.default and getattr(args[0], "constant", None) is None:
            zero = False if args[0].dtype == torch.bool else 0.0 if args[0].is_floating_point() else 0
            return self._answers.get(args[0], zero)
        if func is _aten.nonzero.default:  # every element non-zero
            out = torch.empty((args[0].numel(), args[0].dim()), dtype=torch.long, device=args[0].device)
        else:
            out = func(*args, **kwargs)
        self._memo.clear()
        if func in _READS:
            self._answers[out] = _READS[func](args[0])
        kind = None
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and t.untyped_storage()._cdata not in self._storages:
                kind = kind or self._kind_now(func, args, kwargs)
                self._count(t.untyped_storage()._cdata, t.untyped_storage().nbytes(), kind)
                weakref.finalize(t.untyped_storage(), self._free, t.untyped_storage()._cdata)
                if kind == "loss" and t.grad_fn is not None:
                    t.grad_fn.metadata[_TAG] = "loss"
        return out

    def _kind_now(self, func, args, kwargs) -> str:
        node = torch._C._current_autograd_node()
        if node is not None:
            tagged = node.metadata.get(_TAG)
            return tagged or self.node_kinds.get(getattr(node, "_forward_cls", None), "activations")
        copy = func is _aten._to_copy.default and kwargs.get("device") is not None
        if copy and kwargs.get("dtype") in (None, args[0].dtype):  # to another device, not a cast
            return "host"
        return "loss" if self._at_head and self._kind == "activations" else self._kind

    def _count(self, key: int, size: int, kind: str) -> None:
        self._storages[key] = (size, kind)
        self.live[kind] += size
        self.total += size if kind in self.counted else 0
        self._note_peak()

    def _free(self, key: int) -> None:
        size, kind = self._storages.pop(key)
        self.live[kind] -= size
        self.total -= size if kind in self.counted else 0

    def _note_peak(self) -> None:
        record = self._current
        if record is not None and self.total > record.peak_bytes:
            record.peak_bytes = self.total
            record.kinds = {k: v for k, v in self.live.items() if v and k in self.counted}
            record.step = self._step
