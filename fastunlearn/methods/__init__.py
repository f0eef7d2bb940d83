"""Unlearning methods: a forget term plus a retain term, computed by the patched model
(:mod:`.terms`); the field's named methods as presets of the pair (:mod:`.presets`); the objective of a
training step (:mod:`.objectives`); the reference model without a second copy where the maths allows
(:mod:`.reference`); RMU's setting (:mod:`.rmu`)."""

from fastunlearn.methods.presets import (
    FORGET_TERMS,
    METHODS,
    PRESETS,
    RETAIN_TERMS,
    MethodSpec,
    resolve_method,
)

__all__ = [
    "FORGET_TERMS",
    "METHODS",
    "PRESETS",
    "RETAIN_TERMS",
    "MethodSpec",
    "resolve_method",
]
