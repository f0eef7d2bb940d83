"""The Fisher estimate: a mapping from canonical layer name to a diagonal Fisher tensor, and its file.

A :class:`FisherEstimate` is what :func:`fastunlearn.fisher.estimate_fisher` returns and what
:func:`fastunlearn.fisher.fila_init` consumes. Saved as safetensors (no pickle) with the estimator and
its counts in the metadata, so an estimate can be reused across runs (``unlearn`` resumes with it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from fastunlearn._io import atomic_file
from fastunlearn.modeling import canonical_name

FisherMode = Literal["per_example", "batch", "token"]
FISHER_MODES: tuple[str, ...] = ("per_example", "batch", "token")
FORMAT = "fastunlearn.fisher"
FORMAT_VERSION = "1"

__all__ = ["FISHER_MODES", "FisherEstimate", "FisherMode"]


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

        metadata = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "mode": self.mode,
            "num_examples": str(self.num_examples),
            "num_tokens": str(self.num_tokens),
        }
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
