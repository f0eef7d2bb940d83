"""The diagonal empirical Fisher information of a model's linear layers, without per-example gradients.

For a linear layer and example ``n`` with inputs ``X_n`` and output gradients ``G_n`` of its loss
``L_n``, the weight gradient is ``g_n = G_nᵀ X_n`` and the diagonal empirical Fisher (Cha et al. 2025)
is ``F = (1/N) Σ_n g_n ⊙ g_n``: one backward of ``Σ_n L_n`` gives every ``G_n`` and folds
``Σ_n (G_nᵀ X_n)²`` into ``F`` (:mod:`fastunlearn.fisher.passes`). The square is inside the example
sum and outside the token sum; ``mode="token"`` squares per token, ``mode="batch"`` is the paper
code's ``Σ_b c_b·(∇L̄_b)² / Σ_b c_b`` (``L̄_b`` batch ``b``'s token-mean NLL, ``c_b`` its label
tokens). Under a memory budget the layers are split into groups whose fp32 accumulators fit, and the
data is passed once per group; a layer's estimate does not depend on the grouping. A
:class:`FisherEstimate` is saved as safetensors (no pickle) with the estimator and its counts in the
metadata, for reuse across runs; :class:`FisherFile` writes the same file layer by layer.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor, nn

from fastunlearn._io import atomic_file
from fastunlearn.engines import distributed
from fastunlearn.engines.distributed import linear_shape
from fastunlearn.fisher.budget import (
    FILA_ACCUMULATORS,
    accumulator_bytes,
    available_memory,
    parse_bytes,
    plan_groups,
    resolve_budget,
    select_linear_layers,
)
from fastunlearn.fisher.passes import Data, fisher_session, prepare_batches, run_pass
from fastunlearn.models.loading import is_quantized
from fastunlearn.models.naming import canonical_name
from fastunlearn.ops._backend import Backend, resolve_backend

FisherMode = Literal["per_example", "batch", "token"]
FISHER_MODES: tuple[str, ...] = ("per_example", "batch", "token")
FORMAT = "fastunlearn.fisher"
FORMAT_VERSION = "1"
_V = TypeVar("_V")


def check_finite(tensors: Mapping[str, Tensor], what: str) -> None:
    bad = [name for name, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"{what} has non-finite values (inf or nan) in {len(bad)} layer(s): {bad[:8]}")


def check_mode(mode: str) -> None:
    if mode not in FISHER_MODES:
        raise ValueError(f"unknown Fisher mode {mode!r}; expected one of {FISHER_MODES}")


def canonical_keys(mapping: Mapping[str, _V], what: str) -> dict[str, _V]:
    """``mapping`` by canonical layer name (``ValueError`` when two names are one layer)."""
    table: dict[str, _V] = {}
    for name, value in mapping.items():
        key = canonical_name(name)
        if key in table:
            raise ValueError(f"{what} has two entries for layer {key!r}")
        table[key] = value
    return table


def layer_table(mapping: Mapping[str, Tensor], what: str, dim: int | None = None) -> dict[str, Tensor]:
    """``mapping`` by canonical layer name, its values checked to be floating tensors (``dim``-D)."""
    if not isinstance(mapping, Mapping):
        raise TypeError(f"{what} must be a mapping of layer name to tensor")
    for name, tensor in mapping.items():
        if (
            not isinstance(tensor, Tensor)
            or not tensor.is_floating_point()
            or dim not in (None, tensor.dim())
        ):
            raise TypeError(
                f"{what}[{name!r}] must be a {'' if dim is None else f'{dim}-D '}floating-point tensor"
            )
    return canonical_keys(mapping, what)


class LayerTable(Mapping[str, Tensor]):
    """fp32 tensors by canonical layer name; lookups accept peft-style names too."""

    def __init__(self, tensors: Mapping[str, Tensor], what: str, dim: int | None = None) -> None:
        self._tensors = {key: t.float() for key, t in layer_table(tensors, what, dim).items()}

    def __getitem__(self, name: str) -> Tensor:
        return self._tensors[canonical_name(name)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and canonical_name(name) in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def _save(self, path: str | os.PathLike, metadata: dict[str, str], overwrite: bool) -> None:
        from safetensors.torch import save_file

        tensors = {n: t.detach().to("cpu").contiguous() for n, t in self._tensors.items()}
        atomic_file(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), overwrite=overwrite)


class FisherEstimate(LayerTable):
    """Diagonal Fisher estimates of linear layers: canonical layer name → fp32 tensor shaped like ``W``.

    Attributes:
        num_examples: sequences that carried at least one label token (the ``N`` of the mean).
        num_tokens: label tokens seen (``Σ_b c_b``, the normaliser of ``mode="batch"``).
        mode: the estimator, ``"per_example"``, ``"batch"`` or ``"token"``.
    """

    def __init__(
        self, tensors: Mapping[str, Tensor], *, num_examples: int, num_tokens: int, mode: str
    ) -> None:
        check_mode(mode)
        super().__init__(tensors, "the Fisher estimate")
        self.num_examples = int(num_examples)
        self.num_tokens = int(num_tokens)
        self.mode = mode

    def __repr__(self) -> str:
        return (
            f"FisherEstimate({len(self)} layers, mode={self.mode!r}, num_examples={self.num_examples}, "
            f"num_tokens={self.num_tokens})"
        )

    def to(self, device: torch.device | str) -> FisherEstimate:
        tensors = {n: t.to(device) for n, t in self._tensors.items()}
        return FisherEstimate(
            tensors, num_examples=self.num_examples, num_tokens=self.num_tokens, mode=self.mode
        )

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write a safetensors file (tensors plus ``format``/``mode``/counts metadata), atomically."""
        self._save(path, _metadata(self.mode, self.num_examples, self.num_tokens), overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: torch.device | str = "cpu") -> FisherEstimate:
        """Read a file written by :meth:`save`; ``ValueError`` if it is not one."""
        tensors, metadata = read_tagged_safetensors(
            path, FORMAT, FORMAT_VERSION, what="Fisher estimate", device=device
        )
        try:
            counts = int(metadata["num_examples"]), int(metadata["num_tokens"])
        except (KeyError, ValueError) as err:
            raise ValueError(f"{path}: malformed Fisher metadata {metadata}") from err
        return cls(tensors, num_examples=counts[0], num_tokens=counts[1], mode=metadata.get("mode", ""))


def _metadata(mode: str, num_examples: int, num_tokens: int) -> dict[str, str]:
    counts = {"num_examples": str(num_examples), "num_tokens": str(num_tokens)}
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "mode": mode, **counts}


class FisherFile:
    """A Fisher estimate's safetensors file written layer by layer, never holding the estimate.

    A safetensors file is an 8-byte header length, a JSON header (metadata and each tensor's dtype,
    shape and data offsets, space-padded to 8 bytes), then the data. Every tensor of an estimate is fp32
    shaped like its weight and the counts are known beforehand, so the header is written first and the
    layers follow in the order of ``shapes`` (name → weight shape), as the passes finish them.
    """

    def __init__(
        self, shapes: Mapping[str, Sequence[int]], *, num_examples: int, num_tokens: int, mode: str
    ) -> None:
        check_mode(mode)
        self.shapes = {
            key: tuple(int(n) for n in s) for key, s in canonical_keys(shapes, "the Fisher file").items()
        }
        self.num_examples = int(num_examples)
        self.num_tokens = int(num_tokens)
        self.mode = mode

    def _header(self) -> bytes:
        header: dict[str, Any] = {"__metadata__": _metadata(self.mode, self.num_examples, self.num_tokens)}
        offset = 0
        for name, shape in self.shapes.items():
            end = offset + 4 * math.prod(shape)
            header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, end]}
            offset = end
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)
        return struct.pack("<Q", len(encoded)) + encoded

    def write(
        self, path: str | os.PathLike, tensors: Iterable[tuple[str, Tensor]], *, overwrite: bool = False
    ) -> None:
        """Write ``tensors`` (name, estimate), in the order and shapes of ``shapes``, to ``path``
        atomically, one layer in host memory at a time; ``ValueError`` for a non-finite, missing, extra,
        out-of-order or misshapen layer, leaving ``path`` untouched."""

        def write(tmp: str) -> None:
            expected = iter(self.shapes.items())
            with open(tmp, "wb") as handle:
                handle.write(self._header())
                handle.flush()
                for name, tensor in tensors:
                    key, shape = next(expected, (None, None))
                    if canonical_name(name) != key or tuple(tensor.shape) != shape:
                        raise ValueError(
                            f"Fisher layer {name!r} {tuple(tensor.shape)} where the file's header has "
                            f"{key!r} {shape}"
                        )
                    check_finite({key: tensor}, "the Fisher estimate")
                    host = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
                    handle.write(memoryview(host.astype("<f4", copy=False)).cast("B"))
                    handle.flush()  # out of the process before the next group's pass
                    del host
                missing = [key for key, _ in expected]
                if missing:
                    raise ValueError(f"the Fisher estimate lacks {len(missing)} layer(s): {missing[:8]}")
                handle.flush()
                os.fsync(handle.fileno())

        atomic_file(path, write, overwrite=overwrite)


def read_tagged_safetensors(
    path: str | os.PathLike, format_name: str, format_version: str, *, what: str, device: torch.device | str
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file fastunlearn wrote with ``format_name`` and
    ``format_version`` in its metadata: ``FileNotFoundError`` when ``path`` is not a file,
    ``ValueError`` naming ``what`` when it is another kind or version."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    with safe_open(str(path), framework="pt", device=str(device)) as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != format_name:
            raise ValueError(f"{path} is not a fastunlearn {what} file (metadata {metadata})")
        if metadata.get("format_version") != format_version:
            raise ValueError(f"{path}: unsupported {what} format version {metadata.get('format_version')!r}")
        return {name: handle.get_tensor(name) for name in handle.keys()}, metadata  # noqa: SIM118


def layer_estimates(
    model: nn.Module,
    batches: Mapping[str, Iterable[Mapping[str, Any]]],
    options: Mapping[str, Any],
    *,
    cpu_half: bool,
) -> tuple[dict[str, nn.Linear], dict[str, Data], Iterator[tuple[str, dict[str, Tensor], int]]]:
    """With everything that can fail before a pass checked: the measured layers, each data set of
    ``batches`` (label → batches) prepared, and a generator of ``(name, {label: estimate}, groups)``
    per layer in the order of ``layers`` (scaled by its count, on the layers' device) as each group's
    passes end, its Fisher session open while the caller consumes it. ``options``:
    :func:`estimate_fisher`'s keyword arguments; without ``max_memory`` the CPU budget is half the host
    memory (``cpu_half``) or unlimited."""
    mode, backend = options["mode"], options["backend"]
    max_memory = options["max_memory"]
    budget = None if max_memory is None else parse_bytes(max_memory)
    check_mode(mode)
    layers = select_linear_layers(model, options["target_modules"])
    for device in {layer.weight.device for layer in layers.values()}:
        resolve_backend(backend, device)  # an unusable backend fails now, not inside the backward
    for name, layer in layers.items():
        if not layer.weight.is_floating_point() and not is_quantized(layer):
            raise TypeError(
                f"layer {name!r} stores {layer.weight.dtype} weights (quantised?); cannot measure it"
            )
    named = len(batches) > 1
    data = {label: prepare_batches(b, label if named else None) for label, b in batches.items()}
    sizes = accumulator_bytes(layers, len(data))
    what = FILA_ACCUMULATORS if named else "fp32 accumulator"
    cpu = (lambda: available_memory(torch.device("cpu")) // 2) if cpu_half else lambda: sum(sizes.values())
    scale = {label: 1 / (d.num_tokens if mode == "batch" else d.num_examples) for label, d in data.items()}
    run = functools.partial(run_pass, model, mode=mode, backend=backend, progress=options["progress"])

    def passes() -> Iterator[tuple[str, dict[str, Tensor], int]]:
        with fisher_session(model, options["gradient_checkpointing"]):
            limit, origin = resolve_budget(
                budget, model, list(data.values()), layers, mode=mode, backend=backend, cpu_default=cpu
            )
            groups = plan_groups(sizes, limit, what=what, origin=origin)
            for index, group in enumerate(groups):
                part = f", layers {index + 1}/{len(groups)}" if len(groups) > 1 else ""
                subset = {name: layers[name] for name in group}
                sums = {label: run(d, subset, desc=f"Fisher ({label}){part}") for label, d in data.items()}
                for name in group:
                    estimates = {label: sums[label].pop(name).mul_(scale[label]) for label in data}
                    yield name, estimates, len(groups)

    return layers, data, passes()


def estimate_fisher(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    target_modules: str | Sequence[str] | None = None,
    mode: FisherMode = "per_example",
    backend: Backend = "auto",
    max_memory: int | str | None = None,
    gradient_checkpointing: bool | None = None,
    progress: bool = True,
) -> FisherEstimate:
    """Diagonal empirical Fisher of a causal LM's linear layers over ``batches`` (module docstring).

    ``batches``: dicts with ``input_ids`` and ``labels`` (``[B, T]``, ``-100`` = no loss, aligned as in
    Hugging Face), optionally ``attention_mask``, ``position_ids``; read once and kept.
    ``target_modules``: canonical names or dotted suffixes (default every ``nn.Linear`` but the head).
    ``max_memory``: bytes (or ``"4GiB"``) the accumulators may take at once; by default on CUDA what is
    free after the model and a pass's activations, on the CPU no limit. ``gradient_checkpointing``:
    recompute each decoder layer in the backward (``None``: as the model does).

    The passes run in eval mode with frozen weights, restored however the function exits. The result is
    on the layers' device when one group holds every layer, else on the CPU.
    """
    options = dict(target_modules=target_modules, mode=mode, backend=backend, max_memory=max_memory,
                   gradient_checkpointing=gradient_checkpointing, progress=progress)  # fmt: skip
    _, sets, estimates = layer_estimates(model, {mode: batches}, options, cpu_half=False)
    fisher: dict[str, Tensor] = {}
    with contextlib.closing(estimates):  # the session ends here whatever happens
        for name, tensors, groups in estimates:
            fisher[name] = tensors[mode].to("cpu") if groups > 1 else tensors[mode]
    check_finite(fisher, "the Fisher estimate")
    data = sets[mode]
    return FisherEstimate(fisher, num_examples=data.num_examples, num_tokens=data.num_tokens, mode=mode)


def save_fisher(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    target_modules: str | Sequence[str] | None = None,
    mode: FisherMode = "per_example",
    backend: Backend = "auto",
    max_memory: int | str | None = None,
    gradient_checkpointing: bool | None = None,
    progress: bool = True,
) -> FisherFile:
    """:func:`estimate_fisher` written to ``path`` (:class:`~.estimate.FisherFile`) as each group's
    pass ends, one layer in host memory at a time; returns the :class:`FisherFile`. On the CPU the default
    budget is half the available host memory. Every rank runs the passes; the main one writes.
    """
    options = dict(target_modules=target_modules, mode=mode, backend=backend, max_memory=max_memory,
                   gradient_checkpointing=gradient_checkpointing, progress=progress)  # fmt: skip
    layers, sets, estimates = layer_estimates(model, {mode: batches}, options, cpu_half=True)
    shapes = {name: linear_shape(layer) for name, layer in layers.items()}
    data = sets[mode]
    written = FisherFile(shapes, num_examples=data.num_examples, num_tokens=data.num_tokens, mode=mode)
    tensors = ((name, tensors[mode]) for name, tensors, _ in estimates)
    with contextlib.closing(estimates):
        if distributed.is_main():
            written.write(path, tensors, overwrite=overwrite)
        else:  # every rank drives the passes (their accumulators are all-reduced); the main one writes
            for name, tensor in tensors:
                check_finite({name: tensor}, "the Fisher estimate")
    return written
