"""Plain fp64 references of the unlearning objectives (SPEC §2), shared by the method and trainer tests.

Each writes the formula out on the fp64 logits of the model, independently of the package's code paths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def shifted_fp64(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    return logits[:, :-1], batch["labels"][:, 1:]


def ref_nll(model, batch) -> torch.Tensor:
    z, y = shifted_fp64(model, batch)
    valid = y != -100
    logp = torch.log_softmax(z, -1).gather(-1, y.clamp_min(0)[..., None])[..., 0]
    return -(logp * valid).sum() / valid.sum()


def ref_ihl(model, batch) -> torch.Tensor:
    """``mean over valid tokens of 1 + p_y − max_{v≠y} p_v``, written plainly in fp64."""
    z, y = shifted_fp64(model, batch)
    valid = y != -100
    p = torch.softmax(z, -1)
    onehot = F.one_hot(y.clamp_min(0), z.shape[-1]).bool()
    p_y = p.masked_fill(~onehot, 0).sum(-1)
    p_m = p.masked_fill(onehot, -1.0).max(-1).values
    return ((1 + p_y - p_m) * valid).sum() / valid.sum()


def ref_seq_logp(model, batch) -> torch.Tensor:
    z, y = shifted_fp64(model, batch)
    valid = y != -100
    logp = torch.log_softmax(z, -1).gather(-1, y.clamp_min(0)[..., None])[..., 0]
    return (logp * valid).sum(-1)


def ref_objective(model, batch, method: str, beta: float) -> torch.Tensor:
    forget, retain = batch["forget"], batch.get("retain")
    if method == "ihl":
        return ref_ihl(model, forget) + ref_nll(model, retain)
    if method == "ga":
        return -ref_nll(model, forget)
    if method == "gd":
        return -ref_nll(model, forget) + ref_nll(model, retain)
    ratio = ref_seq_logp(model, forget) - forget["ref_logp"].double()
    return (2 / beta) * torch.log1p(torch.exp(beta * ratio)).mean() + ref_nll(model, retain)
