"""Plain fp64 references of the unlearning objectives (every forget and retain term), shared by the
method and trainer tests.

Each writes the formula out on the fp64 logits (or layer activations) of the model, independently of
the package's code paths: the per-sequence losses in their softplus form (``(2/β)·log(1 + e^{±βx})``,
not the package's ``logsigmoid``), the KL from two full log-softmaxes, IdK's pooled mean over the two
batches literally concatenated, RMU's activation loss with loops over sequences. ``reference`` is a
true copy of the model before unlearning; ``rmu`` is ``(layer, target [d])``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def shifted_fp64(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    return logits[:, :-1], batch["labels"][:, 1:]


def _token_logp(model, batch):
    z, y = shifted_fp64(model, batch)
    valid = y != -100
    return torch.log_softmax(z, -1).gather(-1, y.clamp_min(0)[..., None])[..., 0] * valid, valid


def ref_nll(model, batch) -> torch.Tensor:
    logp, valid = _token_logp(model, batch)
    return -logp.sum() / valid.sum()


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
    return _token_logp(model, batch)[0].sum(-1)


def ref_counts(batch) -> torch.Tensor:
    return (batch["labels"][:, 1:] != -100).sum(-1)


def _softplus(x: torch.Tensor) -> torch.Tensor:
    return torch.log1p(torch.exp(x))


def ref_kl(model, reference, batch, targets_only: bool) -> torch.Tensor:
    """``KL(P_ref‖P_θ)`` per position from both models' full fp64 log-softmaxes: the mean over every
    position of the batch (padding included), or over the positions followed by a target."""
    z = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    with torch.no_grad():
        r = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    log_q, log_p = torch.log_softmax(r, -1), torch.log_softmax(z, -1)
    rows = (log_q.exp() * (log_q - log_p)).sum(-1)
    if not targets_only:
        return rows.mean()
    mask = torch.zeros_like(rows, dtype=torch.bool)
    mask[:, :-1] = batch["labels"][:, 1:] != -100
    return rows[mask].mean()


def layer_output(model, batch, layer: int) -> torch.Tensor:
    """Decoder layer ``layer``'s output (a hook on the Llama stack; fp64)."""
    kept = []
    stack = model.get_decoder().layers
    hook = stack[layer].register_forward_hook(
        lambda m, a, out: kept.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        hook.remove()
    return kept[0].double()


def ref_act(hidden: torch.Tensor, target: torch.Tensor, batch) -> torch.Tensor:
    """RMU's ``mean_x [Σ_{t target} mean_d (h_t − g_t)² / n(x)]``, one sequence at a time."""
    g = target.double().expand_as(hidden) if target.dim() == 1 else target.double()
    total = hidden.new_zeros(())
    for i in range(hidden.shape[0]):
        targets = [t for t in range(hidden.shape[1] - 1) if batch["labels"][i, t + 1] != -100]
        per_token = [((hidden[i, t] - g[i, t]) ** 2).mean() for t in targets]
        total = total + (sum(per_token) / len(per_token) if per_token else 0.0)
    return total / hidden.shape[0]


def ref_forget(model, batch, spec, rmu=None) -> torch.Tensor:
    forget, beta = batch["forget"], spec.beta
    if spec.forget == "ihl":
        return ref_ihl(model, forget)
    if spec.forget == "ga":
        return -ref_nll(model, forget)
    if spec.forget == "npo":
        return (2 / beta) * _softplus(
            beta * (ref_seq_logp(model, forget) - forget["ref_logp"].double())
        ).mean()
    if spec.forget == "simnpo":
        mean_nll = -ref_seq_logp(model, forget) / ref_counts(forget)
        return (2 / beta) * _softplus(-beta * (mean_nll - spec.delta)).mean()
    if spec.forget == "idk":
        return ref_nll(model, batch["idk"])
    if spec.forget == "dpo":
        idk = batch["idk"]
        chosen = ref_seq_logp(model, idk) - idk["ref_logp"].double()
        rejected = ref_seq_logp(model, forget) - forget["ref_logp"].double()
        return (2 / beta) * _softplus(-beta * (chosen - rejected)).mean()
    layer, target = rmu
    return ref_act(layer_output(model, forget, layer), target, forget)


def ref_retain(model, batch, spec, reference=None, rmu=None) -> torch.Tensor:
    retain = batch["retain"]
    if spec.retain == "nll":
        return ref_nll(model, retain)
    if spec.retain in ("kl", "kl_targets"):
        return ref_kl(model, reference, retain, spec.retain == "kl_targets")
    with torch.no_grad():
        target = layer_output(reference, retain, rmu[0])
    return ref_act(layer_output(model, retain, rmu[0]), target, retain)


def concatenated(a, b, pad_id: int = 0):
    """Two right-padded batches as one, padded to the longer."""
    T = max(a["input_ids"].shape[1], b["input_ids"].shape[1])
    pads = {"input_ids": pad_id, "attention_mask": 0, "labels": -100}
    return {
        key: torch.cat([F.pad(x[key], (0, T - x[key].shape[1]), value=pads[key]) for x in (a, b)])
        for key in pads
    }


def ref_pooled_idk(model, batch, spec) -> torch.Tensor:
    """NLL of the IdK and retain batches concatenated into one batch: one token mean, each row's
    tokens weighted by its batch's weight."""
    idk, retain = batch["idk"], batch["retain"]
    both = concatenated(idk, retain)
    weights = torch.tensor(
        [spec.forget_weight] * len(idk["labels"]) + [spec.retain_weight] * len(retain["labels"])
    )
    logp, valid = _token_logp(model, both)
    return -(weights.double()[:, None] * logp).sum() / valid.sum()


def ref_objective(model, batch, spec, *, reference=None, rmu=None) -> torch.Tensor:
    """``γ·forget + α·retain`` of ``spec`` (a :class:`fastunlearn.methods.MethodSpec`) in fp64."""
    if spec.forget == "idk" and spec.retain == "nll":
        return ref_pooled_idk(model, batch, spec)
    loss = spec.forget_weight * ref_forget(model, batch, spec, rmu)
    if spec.retain != "none":
        loss = loss + spec.retain_weight * ref_retain(model, batch, spec, reference, rmu)
    return loss
