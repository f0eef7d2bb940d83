"""Unlearning methods as a weighted forget term plus a weighted retain term; the field's methods as presets.

The loss of a step is ``γ·forget_term + α·retain_term`` (:mod:`.objectives`, with the reference model
before unlearning, and RMU's setting of :mod:`.rmu`). Forget terms: ``ihl`` (Cha et al. 2025, arXiv
2408.06621), ``ga`` (−NLL; Jang et al. 2023), ``npo`` (Zhang et al. 2024, arXiv 2404.05868), ``simnpo``
(Fan et al. 2024, arXiv 2410.07163), ``idk`` (NLL of a refusal; Maini et al. 2024, arXiv 2401.06121),
``dpo`` (the refusal preferred; Rafailov et al. 2023, arXiv 2305.18290), ``rmu`` (Li et al. 2024, arXiv
2403.03218). Retain terms: ``nll``, ``kl`` (TOFU's, every position), ``kl_targets``, ``rmu``, ``none``.
The presets carry their published weights and β.
"""

from __future__ import annotations

from dataclasses import dataclass

FORGET_TERMS = ("ihl", "ga", "npo", "simnpo", "idk", "dpo", "rmu")
RETAIN_TERMS = ("nll", "kl", "kl_targets", "rmu", "none")
# β of the forget terms that have one: NPO and DPO's 0.1, SimNPO's 4.5 (open-unlearning's defaults).
TERM_BETA = {"npo": 0.1, "dpo": 0.1, "simnpo": 4.5}


@dataclass(frozen=True)
class MethodSpec:
    """A resolved method: the two terms, their weights, and the forget term's β and δ."""

    forget: str
    retain: str
    forget_weight: float = 1.0
    retain_weight: float = 1.0
    beta: float = 0.1
    delta: float = 0.0

    @property
    def needs_retain(self) -> bool:
        return self.retain != "none"

    @property
    def uses_refusals(self) -> bool:
        """IdK and DPO pair each forget question with a refusal answer."""
        return self.forget in ("idk", "dpo")

    @property
    def parts(self) -> tuple[str, ...]:
        """The parts of a training batch the objective reads."""
        return ("forget",) + ("idk",) * self.uses_refusals + ("retain",) * self.needs_retain

    @property
    def fixed_reference(self) -> tuple[str, ...]:
        """The batch parts whose reference log-probabilities are taken once before training."""
        return {"npo": ("forget",), "dpo": ("forget", "idk")}.get(self.forget, ())

    @property
    def step_reference(self) -> bool:
        """Whether the retain term runs the reference model at every step (KL, RMU)."""
        return self.retain in ("kl", "kl_targets", "rmu")

    @property
    def uses_rmu(self) -> bool:
        return "rmu" in (self.forget, self.retain)

    @property
    def pooled(self) -> bool:
        """IdK with the NLL retain term: one token mean over the IdK and retain batches (TOFU's idk
        concatenates them), each batch's tokens weighted by its term's weight."""
        return self.forget == "idk" and self.retain == "nll"


def _preset(forget: str, retain: str, forget_weight: float = 1.0, retain_weight: float = 1.0) -> MethodSpec:
    return MethodSpec(forget, retain, forget_weight, retain_weight, TERM_BETA.get(forget, 0.1))


PRESETS: dict[str, MethodSpec] = {
    "ihl": _preset("ihl", "nll"),  # Cha et al. 2025
    "ga": _preset("ga", "none"),  # TOFU grad_ascent
    "gd": _preset("ga", "nll"),  # TOFU grad_diff
    "kl": _preset("ga", "kl"),  # TOFU KL
    "npo": _preset("npo", "none"),  # Zhang et al. 2024
    "npo+gd": _preset("npo", "nll"),  # npo_grad_diff; MUSE npo_gdr
    "npo+kl": _preset("npo", "kl"),  # MUSE npo_klr
    "simnpo": _preset("simnpo", "nll", forget_weight=0.125),  # Fan et al. 2024; open-unlearning
    "idk": _preset("idk", "nll"),  # TOFU idk
    "dpo": _preset("dpo", "nll"),  # TOFU dpo; open-unlearning IdkDPO
    "rmu": _preset("rmu", "rmu", retain_weight=1200.0),  # Li et al. 2024 (WMDP)
}
METHODS = tuple(PRESETS)


def resolve_method(
    method: str,
    *,
    forget_term: str | None = None,
    retain_term: str | None = None,
    forget_weight: float | None = None,
    retain_weight: float | None = None,
    beta: float | None = None,
    delta: float = 0.0,
) -> MethodSpec:
    """The preset ``method`` with any of its terms, weights and β overridden (``None``: the preset's;
    β: the forget term's default). ``ValueError`` naming an unknown method or term."""
    for name, value, allowed in (
        ("method", method, METHODS),
        ("forget_term", forget_term, FORGET_TERMS),
        ("retain_term", retain_term, RETAIN_TERMS),
    ):
        if value is not None and value not in allowed:
            raise ValueError(f"unknown {name} {value!r}; expected one of {list(allowed)}")
    preset = PRESETS[method]
    forget, retain = forget_term or preset.forget, retain_term or preset.retain
    # A preset's weight belongs to its own term (SimNPO's γ = 0.125, RMU's α = 1200).
    if forget_weight is None:
        forget_weight = preset.forget_weight if forget == preset.forget else 1.0
    if retain_weight is None:
        retain_weight = preset.retain_weight if retain == preset.retain else 1.0
    beta = beta if beta is not None else TERM_BETA.get(forget, 0.1)
    return MethodSpec(forget, retain, forget_weight, retain_weight, beta, delta)
