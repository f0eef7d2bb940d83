"""The Fisher estimate: a mapping from canonical layer name to a diagonal Fisher tensor, and its file.

A :class:`FisherEstimate` is what :func:`fastunlearn.fisher.estimate_fisher` returns and what
:func:`fastunlearn.fisher.fila_init` consumes. Saved as safetensors (no pickle) with the estimator and
its counts in the metadata, so an estimate can be reused across runs. :class:`FisherFile` writes the
same file layer by layer as the estimate is computed (:func:`fastunlearn.fisher.save_fisher`).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from fastunlearn._io import atomic_file
from fastunlearn.models.naming import canonical_name

FisherMode = Literal["per_example", "batch", "token"]
FISHER_MODES: tuple[str, ...] = ("per_example", "batch", "token")
FORMAT = "fastunlearn.fisher"
FORMAT_VERSION = "1"

__all__ = ["FISHER_MODES", "FisherEstimate", "FisherFile", "FisherMode"]


def _check_finite(tensors: Mapping[str, Tensor], what: str) -> None:
    bad = [name for name, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"{what} has non-finite values (inf or nan) in {len(bad)} layer(s): {bad[:8]}")


class FisherEstimate(Mapping[str, Tensor]):
    """Diagonal Fisher estimates of linear layers: canonical layer name → fp32 tensor shaped like ``W``.

    Attributes:
        num_examples: sequences that carried at least one label token (the ``N`` of the mean).
        num_tokens: label tokens seen (``Σ_b c_b``, the normaliser of ``mode="batch"``).
        mode: the estimator, ``"per_example"``, ``"batch"`` or ``"token"``.

    Keys are canonical names (:func:`canonical_name`); lookups accept peft-style names too.
    """

    def __init__(
        self, tensors: Mapping[str, Tensor], *, num_examples: int, num_tokens: int, mode: str
    ) -> None:
        if mode not in FISHER_MODES:
            raise ValueError(f"unknown Fisher mode {mode!r}; expected one of {FISHER_MODES}")
        self._tensors: dict[str, Tensor] = {}
        for name, tensor in tensors.items():
            if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
                raise TypeError(f"Fisher entry {name!r} must be a floating-point tensor")
            key = canonical_name(name)
            if key in self._tensors:
                raise ValueError(f"Fisher entries {name!r} and another both map to layer {key!r}")
            self._tensors[key] = tensor.float()
        self.num_examples = int(num_examples)
        self.num_tokens = int(num_tokens)
        self.mode = mode

    def __getitem__(self, name: str) -> Tensor:
        return self._tensors[canonical_name(name)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and canonical_name(name) in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        return (
            f"FisherEstimate({len(self)} layers, mode={self.mode!r}, num_examples={self.num_examples}, "
            f"num_tokens={self.num_tokens})"
        )

    def to(self, device: torch.device | str) -> FisherEstimate:
        return FisherEstimate(
            {n: t.to(device) for n, t in self._tensors.items()},
            num_examples=self.num_examples,
            num_tokens=self.num_tokens,
            mode=self.mode,
        )

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write a safetensors file (tensors plus ``format``/``mode``/counts metadata), atomically."""
        from safetensors.torch import save_file

        metadata = _metadata(self.mode, self.num_examples, self.num_tokens)
        tensors = {n: t.detach().to("cpu").contiguous() for n, t in self._tensors.items()}
        atomic_file(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), overwrite=overwrite)

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
    """The metadata of a Fisher estimate's file: its format and the estimator's counts."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "mode": mode,
        "num_examples": str(num_examples),
        "num_tokens": str(num_tokens),
    }


class FisherFile:
    """A Fisher estimate's safetensors file written layer by layer, never holding the estimate.

    The safetensors layout is an 8-byte little-endian header length, a JSON header (``__metadata__``
    and, per tensor, its dtype, shape and ``[begin, end)`` byte offsets into the data, which must
    cover the data without holes; the header is padded with spaces to a multiple of 8 bytes), then
    the data. Every tensor of an estimate is fp32 and shaped like its layer's weight, and the counts
    of the metadata are known once the data is read, so the header can be written before any layer is
    estimated; the layers' data then follows in the header's order (the model's order, which is the
    order the passes finish them). :meth:`FisherEstimate.load` and ``safetensors.safe_open`` read the
    file as they read :meth:`FisherEstimate.save`'s (``safetensors`` orders tensors by offset, not by
    name).

    ``shapes``: layer name (made canonical) → weight shape, in the order the layers will be written.
    """

    def __init__(
        self, shapes: Mapping[str, Sequence[int]], *, num_examples: int, num_tokens: int, mode: str
    ) -> None:
        if mode not in FISHER_MODES:
            raise ValueError(f"unknown Fisher mode {mode!r}; expected one of {FISHER_MODES}")
        self.shapes: dict[str, tuple[int, ...]] = {}
        for name, shape in shapes.items():
            key = canonical_name(name)
            if key in self.shapes:
                raise ValueError(f"Fisher entries {name!r} and another both map to layer {key!r}")
            self.shapes[key] = tuple(int(n) for n in shape)
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
        """Write ``tensors`` (name, estimate), which must come in the order and shapes of ``shapes``,
        to ``path`` atomically (a temporary file renamed into place once every layer is in). Each is
        checked finite as it comes; ``ValueError`` for a non-finite, missing, extra, out-of-order or
        misshapen layer, and ``path`` is left untouched."""

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
                    _check_finite({key: tensor}, "the Fisher estimate")
                    host = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
                    handle.write(memoryview(host.astype("<f4", copy=False)).cast("B"))
                    handle.flush()  # out of the process before the next group's pass
                    del host  # one layer in host memory at a time
                missing = [key for key, _ in expected]
                if missing:
                    raise ValueError(f"the Fisher estimate lacks {len(missing)} layer(s): {missing[:8]}")
                handle.flush()
                os.fsync(handle.fileno())

        atomic_file(path, write, overwrite=overwrite)


def read_tagged_safetensors(
    path: str | os.PathLike, format_name: str, format_version: str, *, what: str, device: torch.device | str
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file fastunlearn wrote with ``{"format": format_name,
    "format_version": format_version}`` in its metadata (no pickle: safetensors only).

    ``FileNotFoundError`` when ``path`` is not a file; ``ValueError`` naming ``what`` when the file is
    another kind or another version.
    """
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
