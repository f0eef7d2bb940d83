"""The per-sequence unlearning losses in fp64, each written from its other standard form.

- NPO: ``(2/β)·mean log(1 + (π_θ/π_ref)^β) = (2/β)·mean softplus(β·(S_θ − S_ref))``;
- SimNPO: ``(2/β)·mean softplus(−β·(N̄ − δ))``, ``N̄ = −S/n`` (``n`` at least 1);
- DPO: ``(2/β)·mean softplus(−β·Δ)``;
- RMU: a loop over sequences and their target positions;
- per-sequence log-probabilities: a loop over sequences and positions of fp64 log-softmaxes, the label at
  ``t + 1`` scoring the logits at ``t``.
"""

from __future__ import annotations

import torch


def _softplus(x: torch.Tensor) -> torch.Tensor:
    return torch.logaddexp(x, torch.zeros_like(x))


def npo_reference(logp, ref_logp, beta):
    return (2 / beta * _softplus(beta * (logp.double() - ref_logp.double()))).mean()


def simnpo_reference(logp, n_tokens, beta, delta):
    mean_nll = -logp.double() / n_tokens.double().clamp_min(1)
    return (2 / beta * _softplus(-beta * (mean_nll - delta))).mean()


def dpo_reference(chosen, ref_chosen, rejected, ref_rejected, beta):
    margin = (chosen.double() - ref_chosen.double()) - (rejected.double() - ref_rejected.double())
    return (2 / beta * _softplus(-beta * margin)).mean()


def rmu_reference(hidden, target, mask):
    h, g = hidden.double(), target.double().expand(hidden.shape)
    terms = []
    for x in range(h.shape[0]):
        positions = [t for t in range(h.shape[1]) if mask[x, t]]
        total = sum(((h[x, t] - g[x, t]) ** 2).mean() for t in positions)
        terms.append(total / max(len(positions), 1) if positions else h.new_zeros(()))
    return torch.stack(terms).mean()


def sequence_logprobs_reference(logits, labels, ignore_index=-100):
    z = logits.double()
    sums, counts = [], []
    for b in range(z.shape[0]):
        total, count = z.new_zeros(()), 0
        for t in range(z.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y != ignore_index:
                total = total + z[b, t].log_softmax(-1)[y]
                count += 1
        sums.append(total)
        counts.append(count)
    return torch.stack(sums), torch.tensor(counts)
