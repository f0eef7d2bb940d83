"""Predicted peak device memory of an unlearning run, phase by phase, from a model's shapes alone.

Pure arithmetic on a config (hidden size, layers, heads, vocabulary…): no weights, no ``transformers``.
Each phase's peak is the largest of a few *moments* — the points where the allocator's high-water mark
can occur — and each moment is a sum of named terms, so a plan says not only how much but what.
The terms follow what the code of this package (and PyTorch, ``transformers``, ``peft``) keeps alive,
tensor by tensor; they were checked against the saved-tensor sets and allocator peaks of tiny Llama
models on CPU (tests/test_memory_plan.py). What is predicted is the bytes of live tensors —
``torch.cuda.max_memory_allocated`` — plus, in :attr:`MemoryPlan.device_bytes`, a fixed allowance for
the CUDA context (outside the allocator, not measured here). Allocator fragmentation is not modelled.

Notation: ``H`` hidden size, ``I`` intermediate size, ``L`` decoder layers, ``n_h``/``n_kv`` attention /
key-value heads, ``d`` head dim, ``H_q = n_h·d``, ``H_kv = n_kv·d``, ``V`` vocabulary, ``r`` LoRA rank,
``T`` sequence length (``max_length``: the plan is for full-length batches), ``N = B·T`` tokens of a
batch, ``w`` bytes of a stored weight (``dtype``), ``a`` bytes of an activation (2 under bf16/fp16
autocast, 4 in fp32), ``P`` parameters, ``n`` LoRA parameters ``= L·Σ_targets r·(in + out)``.

Static terms
    weights ``w·P``. LoRA parameters ``4n``: peft keeps adapters in fp32 under a bf16 model
    (``autocast_adapter_dtype``). Training adds their gradients ``4n`` (kept across gradient
    accumulation) and AdamW's two fp32 moments ``8n``, and under autocast the bf16 copies of the
    adapter weights, ``a·n``, which the backward keeps (with checkpointing they exist inside the
    autocast region only, where its cache holds them — the forward moments below — and the
    recomputed layer's are not among the tensors live at its backward's peak, measured).
    ``init="full"`` trains every weight: gradients ``w·P`` and moments ``2w·P`` in the weights' dtype.

Saved activations of one decoder layer, per token (LoRA training under autocast; the set was
enumerated with ``torch.autograd.graph.saved_tensors_hooks`` on tiny models and matches to the byte)
    - 2 RMSNorms: the fp32 upcast of the input and the fp32 ``rsqrt``: ``2·(4H + 4)``. (Layer 0's first
      norm records nothing — its input, the frozen embedding, needs no gradient — and the final norm
      saves the same ``4H + 4``: the count stays ``2L``.)
    - attention (SDPA): ``q``, ``k``, ``v``, the output (``a·H_q`` each; ``k``/``v`` are ``a·H_kv`` unless
      grouped-query attention runs with a padding mask, where ``transformers`` expands them to ``H_q``
      first) and the fp32 log-sum-exp ``4n_h``; with a padding mask, PyTorch converts the boolean mask
      to the query dtype in every layer and the kernel keeps it: ``a·T``.
    - MLP: ``gate`` output (SiLU input), SiLU output and ``up`` output: ``3a·I``.
    - LoRA on a target of input width ``in``: peft casts the input to fp32 and autocast casts it back
      to bf16 for ``lora_A`` — a copy of its own, saved for ``lora_A``'s gradient: ``a·in`` per target
      (``q``, ``k``, ``v`` save three copies of one input), plus ``lora_B``'s input ``a·r``. In fp32
      nothing is cast and the targets share their inputs (saved once per distinct input). The frozen
      base layers save nothing: their input gradient needs only the weight.
    For Llama-2-7B (all linear layers, ``r = 32``, bf16, ``T = 512``, padded): 204,360 bytes per token
    and layer, 26.8 GB for one 4×512 forget batch plus one 4×512 retain batch over 32 layers.

    Fisher estimation (:func:`fastunlearn.estimate_fisher`) runs in eval mode without autocast, all
    weights frozen; its hooks keep every target layer's input (shared inputs once: ``a·H`` for
    ``q/k/v``, ``a·H`` for ``gate/up``, ``a·I`` for ``down``; ``o``'s input is the attention output
    SDPA keeps anyway — a transposed view of its ``[B, T, n_h, d]`` result) on top of the norm,
    attention and MLP terms above; the frozen adapters save nothing. Full fine-tuning saves the same
    layer inputs (for the weight gradients) plus the normalised output of each norm (its weight
    trains): ``+2a·H``.

    With gradient checkpointing (``transformers``, non-reentrant) a layer keeps only its input
    ``a·H``; the final norm ``4H + 4`` stays; during the backward one layer is recomputed, so its full
    set above exists for one layer at a time.

Loss terms, per token of the batch that carries them. ``unlearn`` computes every term inside the
patched model (:mod:`fastunlearn.models.patching`): fused at the output head by default (``fused_linear``),
from the model's logits under ``--no-fused``. The CPU row kernels (:mod:`fastunlearn.ops._ihl_torch`)
work in fp32 blocks of about 2¹⁸ elements: forward, an fp32 copy of the bf16 block, the block with the
target masked and one more (the log-sum-exp's work; for IHL the first-argmax's padded copy and a
512-wide window, ``9·512`` bytes a row); backward, the softmax. The Triton kernels need no blocks.
    - fused, mean or sum (IHL; NLL of the retain term, GA/GD's forget term and the Fisher pass):
      ``∂L/∂h`` is formed in the forward, ``a·H``, and saved; while it is formed the last hidden states
      ``a·H`` and one chunk of logits (``2²⁶`` elements on a GPU, ``2²³`` on CPU, ``a`` bytes each)
      exist; the backward multiplies it by the output gradient: another ``a·H``.
    - fused, per token (NPO's sequence log-probabilities): the hidden states and row statistics are
      saved (``a·H + 32``); the backward recomputes each chunk and forms ``∂L/∂h``, ``a·H``.
    - logits path: the logits ``a·V`` and the row statistics (24 bytes) are saved; the backward writes
      the logits' gradient, ``a·V`` (the old plan's fp32 copies and ``[N, V]`` log-softmax are gone:
      the row kernels read bf16 logits as they are).
    - evaluation (no gradient): per-token NLL and hits at the output head, a chunk of logits at a time
      (fused), or from the ``[B, T, V]`` logits ``a·V`` (logits path), with the row kernels' blocks;
      the decoder's working set (residual stream and MLP intermediates) is a separate, earlier moment.

Moments of a training step (forget and retain are two forward passes whose graphs are both alive
when the summed loss is differentiated; the engine finishes the retain graph — the later one — first)
    - forget / retain loss forward: static + the graphs so far + the term's forward working set, and,
      with checkpointing, every adapter's autocast copy ``a·n`` — autocast caches them inside its
      region, so they all exist at the end of the forward even though no layer keeps them;
    - retain loss backward: static + both graphs' activations + the forget loss's saved tensors + the
      retain term's saved tensors and backward working set;
    - top layer's backward: static + activations + the layer's backward working set: at ``down_proj``
      the base input gradient ``a·I``, the LoRA branch's gradient ``a·I`` cast to fp32 ``4I`` and
      back ``a·I``, and the incoming ``a·H``: ``(3a + 4)·I + a·H`` per token (with checkpointing, plus
      the recomputed layer);
    - with checkpointing, the retain graph's first layer (its last): the forget graph and the forget
      loss's saved tensors, that layer's input, and the gradients of the layers above it waiting as
      below;
    - forget loss backward and the forget graph's top layer (after the retain graph is freed): with
      the retain graph's gradient of every trained weight still waiting, in the weight's dtype (``4n``),
      for the forget graph's — each weight feeds both graphs, and Trainer's autocast (accelerate's,
      one region per model call) makes each forward cast the adapters itself, so the two meet at the
      fp32 leaf. With checkpointing and a rank large against the tokens of a batch this is the peak
      (Llama-2-7B width, ``r = 32``: 12.1 MB a layer at 2×128 tokens, against 4.2 MB for both graphs'
      layer inputs at the retain graph's top layer);
    - optimizer step: AdamW's foreach ``sqrt`` of the second moments, ``4n`` (CUDA; the CPU path loops
      over tensors: three temporaries the size of the largest, measured). Gradient clipping scales in
      place.
    With checkpointing on a CPU run, ``torch.utils.checkpoint`` also keeps the CPU generator's state
    (5,056 bytes) per layer and batch.

Phases
    ``load``: weights. ``evaluate`` (before and after training: fused unless ``--no-fused``; at
    ``eval_batch_size``; after training the adapters and the optimizer — the trainer is still
    referenced — are resident). ``fisher_forget`` and ``fisher_retain``: one forward and backward per
    batch of ``fisher_batch_size`` examples, the batch's summed NLL computed fused at the output head
    (from the logits under ``--no-fused``), with
    fp32 accumulators shaped like every target weight — ``fisher="all_layers"`` is today's
    :func:`~fastunlearn.estimate_fisher` (all accumulators at once, 4 bytes per target weight, and no
    checkpointing: its hooks would see each layer twice); ``fisher="streamed"`` is what ``unlearn``
    does (``fisher_memory``; :func:`~fastunlearn.fisher.fila_row_weights`, ``estimate_fisher(max_memory=)``)
    and the default here: accumulators for a group of layers at a time under ``fisher_memory`` bytes,
    one pass over the data per group, checkpointing allowed (modelled, not yet measured here). The finished
    estimate leaves the device before the next one starts. ``fila``: one layer at a time in fp32
    (:func:`~fastunlearn.fisher.fila_init`), the largest of three moments on the largest layer: the
    weight, both Fisher tensors, ``F_r + ε`` and the ratio (5 copies; on a CPU run the estimates are
    already there: 3); the weight, ratio and ``diag(d)·W`` plus the solver's workspace (full SVD: a copy
    of the input, ``U``, ``Vᵀ`` and, on CUDA, an estimated ``min(m, n)²`` of cuSOLVER work;
    ``"truncated"``: an upper bound on its Krylov basis, ``T``, ``eigh`` and the fp64 Rayleigh–Ritz
    step); the finiteness check of ``W_res`` (``W``, ``W_res``, ``|W_res|`` and three boolean masks:
    3.75 copies). ``train_step``: the moments above. ``save``: the trainer's state plus the rank-``2r``
    export ``[B, −B₀]``, ``[A; A₀]`` in fp32 (``8n``); merging adds two fp32 copies of the largest layer.

Several processes (issue 13): ``engine="ddp"`` replicates everything and adds DDP's fp32 gradient
buckets (``4n``); ``"fsdp"`` and ``"zero3"`` shard weights, gradients and optimizer states over
``world_size`` ranks and gather two decoder layers at a time (the one running and the one prefetched),
FSDP keeping its root unit (embeddings and output head) gathered for the whole step, ZeRO-3 the
largest single module. Activations are per rank (``batch_size`` is per device); Fisher accumulators
are not sharded. ZeRO-3 creates the model sharded; fastunlearn's FSDP (:mod:`fastunlearn.engines.fsdp`)
shards it after FILA, so under ``"fsdp"`` loading, the first evaluation, the Fisher passes and FILA
hold the whole model on every rank.

What is measured and what is assumed. On CPU (``device="cpu"``) every phase of a LoRA run was
measured within 5 % (tests/test_memory_plan.py: training steps of every method on both paths, with
and without checkpointing, the Fisher pass, evaluation on both paths, FILA within 18 % — the plan
over-predicts its SVD step —, save). On CUDA the same terms are assumed with the GPU
paths' differences: the Triton IHL and Fisher kernels need no work buffers; AdamW runs its foreach
path; cuSOLVER's SVD work is an estimate; PyTorch's flash and memory-efficient attention keep the same
``q``, ``k``, ``v``, output, log-sum-exp (and converted mask) as its CPU kernel. ``fisher="streamed"``,
DDP/FSDP/ZeRO-3 and ``init="full"`` are modelled, not measured. benchmarks/bench_scale.py measures a
Llama-2-7B-wide model with 1–4 layers on either device.

One module (about 830 lines, over the project's ~450) by choice: the phases' moments share one
``_Setup`` and the per-token terms above, and each term is read against its neighbours in the same
moment; the shapes and the published configs are apart in :mod:`fastunlearn.plan.model_shapes`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastunlearn.plan.model_shapes import KNOWN_MODELS, ModelShape, model_shape
from fastunlearn.plan.model_shapes import LINEARS as _LINEARS

__all__ = [
    "ENGINES",
    "KNOWN_MODELS",
    "MemoryPlan",
    "ModelShape",
    "Phase",
    "model_shape",
    "plan_memory",
]

GiB = 2**30

# Kept equal to fastunlearn.options.unlearn.INITS / fastunlearn.methods.METHODS (a test
# checks) without importing them: this module is pure arithmetic, importable without torch.
INITS = ("fila", "lora", "full")
METHODS = ("ihl", "ga", "gd", "kl", "npo", "npo+gd", "npo+kl", "simnpo", "idk", "dpo", "rmu")
_NEEDS_RETAIN = ("ihl", "gd", "kl", "npo+gd", "npo+kl", "simnpo", "idk", "dpo", "rmu")
ENGINES = ("none", "ddp", "fsdp", "zero3")
FISHER_MODES = ("streamed", "all_layers")
SOLVERS = ("svd", "randomized", "truncated")
DEVICES = ("cuda", "cpu")
_DTYPES = {"bfloat16": (2, 2), "float16": (2, 2), "float32": (4, 4)}  # (weight bytes, activation bytes)
# The fused losses' logits chunk on a GPU and on CPU (fastunlearn.ops.fused_linear.CHUNK_ELEMENTS,
# CPU_CHUNK_ELEMENTS).
_IHL_CHUNK_ELEMENTS = 1 << 26
_IHL_CPU_CHUNK_ELEMENTS = 1 << 23
# fastunlearn.ops._ihl_torch.CPU_BLOCK_ELEMENTS: rows of the CPU IHL path are processed in blocks this size.
_IHL_CPU_BLOCK = 1 << 18
# fastunlearn.ops._ihl_torch._first_argmax's segment width.
_ARGMAX_WINDOW = 512
# torch.get_rng_state(): the CPU generator's state, saved by torch.utils.checkpoint per call.
_CPU_RNG_STATE = 5056
# The CPU Fisher path's per-example gradient buffer (fastunlearn.ops.grad_sq.TORCH_BUFFER_BYTES).
_FISHER_TORCH_BUFFER = 8 * 2**20
# The truncated solver's defaults and its fp64 chunk (fastunlearn.fisher.solver).
_SOLVER_MAX_ITERS, _SOLVER_CHUNK_BYTES = 40, 8 * (1 << 23)
DEFAULT_FISHER_MEMORY = 4 * GiB
# CUDA context and cuBLAS workspaces: outside the caching allocator, typically 0.3–0.6 GiB.
DEFAULT_CONTEXT_BYTES = GiB // 2


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    """One phase: its candidate moments (label → terms, each term label → bytes) and notes.

    The phase's peak is its largest moment; :attr:`moment` and :attr:`terms` describe that one.
    """

    name: str
    moments: Mapping[str, Mapping[str, int]]
    notes: tuple[str, ...] = ()

    @property
    def moment(self) -> str:
        return max(self.moments, key=lambda k: sum(self.moments[k].values()))

    @property
    def terms(self) -> tuple[tuple[str, int], ...]:
        return tuple(self.moments[self.moment].items())

    @property
    def peak_bytes(self) -> int:
        return sum(self.moments[self.moment].values())


@dataclass(frozen=True)
class MemoryPlan:
    """Per-phase predicted peak device bytes of one rank (module docstring)."""

    model: ModelShape
    settings: dict[str, Any]
    phases: tuple[Phase, ...]
    context_bytes: int = DEFAULT_CONTEXT_BYTES
    notes: tuple[str, ...] = field(default=())

    @property
    def peak_bytes(self) -> int:
        """The largest phase peak (live tensors)."""
        return max(p.peak_bytes for p in self.phases)

    @property
    def device_bytes(self) -> int:
        """:attr:`peak_bytes` plus the CUDA-context allowance: what the device must hold."""
        return self.peak_bytes + self.context_bytes

    def phase(self, name: str) -> Phase:
        for p in self.phases:
            if p.name == name:
                return p
        raise KeyError(f"no phase {name!r}; phases: {[p.name for p in self.phases]}")

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model.name,
            "shape": {k: getattr(self.model, k) for k in self.model.__dataclass_fields__ if k != "name"},
            "settings": self.settings,
            "phases": [
                {
                    "name": p.name,
                    "peak_bytes": p.peak_bytes,
                    "moment": p.moment,
                    "terms": [{"name": n, "bytes": b} for n, b in p.terms],
                    "moments": {k: sum(v.values()) for k, v in p.moments.items()},
                    "notes": list(p.notes),
                }
                for p in self.phases
            ],
            "peak_bytes": self.peak_bytes,
            "context_bytes": self.context_bytes,
            "device_bytes": self.device_bytes,
            "notes": list(self.notes),
        }

    def format_table(self, *, terms: bool = False) -> str:
        """A plain-text table (GB = 10⁹ bytes, GiB = 2³⁰): one row per phase, optionally its terms."""
        s = self.settings
        head = (
            f"{self.model.name}: {s['engine']} × {s['world_size']}, "
            f"batch {s['batch_size']}×{s['max_length']}, "
            f"LoRA r={s['rank']}, init={s['init']}, method={s['method']}, {s['dtype']}, "
            f"checkpointing={'on' if s['gradient_checkpointing'] else 'off'}, "
            f"fused_linear={'on' if s['fused_linear'] else 'off'}, fisher={s['fisher']}"
        )
        rows = [head, f"{'phase':<15}{'peak GB':>10}{'GiB':>9}  at"]
        for p in self.phases:
            rows.append(f"{p.name:<15}{p.peak_bytes / 1e9:>10.2f}{p.peak_bytes / GiB:>9.2f}  {p.moment}")
            if terms:
                rows += [f"{'':<17}{b / 1e9:>8.3f}  {n}" for n, b in p.terms]
                rows += [f"{'':<17}note: {n}" for n in p.notes]
        rows.append(
            f"{'peak':<15}{self.peak_bytes / 1e9:>10.2f}{self.peak_bytes / GiB:>9.2f}  "
            f"(+{self.context_bytes / GiB:.1f} GiB CUDA context: "
            f"{self.device_bytes / 1e9:.2f} GB on the device)"
        )
        rows += [f"note: {n}" for n in self.notes]
        return "\n".join(rows)


@dataclass(frozen=True)
class _Setup:
    shape: ModelShape
    targets: tuple[str, ...]
    rank: int
    T: int
    w: int
    a: int
    padded: bool
    device: str


def _saved_per_token(s: _Setup, regime: str) -> int:
    """Bytes one decoder layer saves for the backward, per token (module docstring).

    ``regime``: ``"lora"`` (adapters train), ``"inputs"`` (Fisher hooks keep the target layers'
    inputs) or ``"full"`` (every weight trains).
    """
    m, a = s.shape, s.a
    H, inner, Hq, Hkv = m.hidden, m.intermediate, m.heads * m.head_dim, m.kv_heads * m.head_dim
    norms = 2 * (4 * H + 4)
    kv = Hq if (m.kv_heads < m.heads and s.padded) else Hkv
    attention = a * (2 * Hq + 2 * kv) + 4 * m.heads + (a * s.T if s.padded else 0)
    mlp = 3 * a * inner
    inputs = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "o"}
    inputs.update({"gate_proj": "mlp", "up_proj": "mlp", "down_proj": "down"})
    width = {"attn": H, "o": Hq, "mlp": H, "down": inner}
    # Uncast, o_proj's input is the attention output SDPA already keeps (returned as a transposed view
    # of a [B, T, n_h, d] tensor, so transformers' .contiguous() copies nothing).
    own = {**width, "o": 0}
    shared = a * sum(own[k] for k in {inputs[t] for t in s.targets})
    if regime == "lora":
        if a == 4:  # nothing is cast: the adapters save the layers' own (shared) inputs
            adapters = shared + 4 * s.rank * len(s.targets)
        else:
            adapters = a * sum(width[inputs[t]] + s.rank for t in s.targets)
        return norms + attention + mlp + adapters
    kept = a * sum(own.values()) if regime == "full" else shared
    return norms + attention + mlp + kept + (2 * a * H if regime == "full" else 0)


def _checkpointed_per_token(s: _Setup) -> int:
    """Per token, with checkpointing: every layer's input and the final norm's saved tensors."""
    return s.shape.layers * s.a * s.shape.hidden + 4 * s.shape.hidden + 4


def _layer_backward_per_token(s: _Setup) -> int:
    """The working set of a layer's backward at ``down_proj`` (module docstring), per token."""
    return (3 * s.a + 4) * s.shape.intermediate + s.a * s.shape.hidden


def _rng_states(s: _Setup) -> int:
    """``torch.utils.checkpoint`` keeps the CPU generator's state per checkpointed call: host memory,
    so it counts on a CPU run only (CUDA's state is a few bytes on the device)."""
    return _CPU_RNG_STATE * s.shape.layers if s.device == "cpu" else 0


@dataclass(frozen=True)
class _LossTerm:
    """One loss term on ``N`` tokens (module docstring, "Loss terms"): what its forward keeps for its
    backward, and the transient working sets of its forward and its backward on top of that."""

    saved_label: str
    saved: int
    forward: dict[str, int]
    backward: dict[str, int]

    def forward_terms(self, who: str) -> dict[str, int]:
        return {f"{who}: {k}": v for k, v in self.forward.items()}

    def backward_terms(self, who: str) -> dict[str, int]:
        return {f"{who}: {k}": v for k, v in self.backward.items()}


def _row_blocks(s: _Setup, N: int, copies: int, per_row: int = 0) -> dict[str, int]:
    """The CPU row kernels' fp32 work: ``copies`` blocks of about 2¹⁸ elements (whole rows, at most
    ``N``) and ``per_row`` bytes more per row of a block; the Triton kernels need none."""
    if s.device != "cpu":
        return {}
    V = s.shape.vocab
    rows = min(N, max(1, _IHL_CPU_BLOCK // V))
    return {"row kernels' fp32 work blocks (CPU path)": rows * (copies * 4 * V + per_row)}


def _loss_term(s: _Setup, kind: str, fused: bool, N: int, head_trains: bool = False) -> _LossTerm:
    """The bytes of a loss term ``kind`` (``"ihl"``, ``"nll"``: a mean or sum; ``"seq_logprob"``:
    per token) on ``N`` tokens, computed fused at the output head or from the model's logits.
    ``head_trains`` (``init="full"``): the output head's weight gradient is formed too."""
    a, H, V, w = s.a, s.shape.hidden, s.shape.vocab, s.w
    # The row kernels' forward (fastunlearn.ops._ihl_torch, enumerated with the profiler): an fp32 copy
    # of the block (none for fp32 logits), the block with the target masked, and one more: the
    # log-sum-exp's work (NLL), or the argmax's padded copy, then the softmax (IHL); IHL's first-argmax
    # also holds a 512-wide window per row (fp32, its comparison and its int32 cast: 9 bytes an
    # element) next to the padded copy. The backward: the softmax.
    forward_copies = 2 + (1 if a != 4 else 0)
    window = 9 * _ARGMAX_WINDOW if kind == "ihl" else 0
    # A trained head: its weight gradient in the weights' dtype; the fused loss sums it over chunks in
    # an fp32 buffer (in the forward for a mean or sum, kept until the backward scales and casts it).
    head_grad = {"output head's weight gradient": w * V * H} if head_trains else {}
    fp32_head = {"output head's fp32 ∂W accumulator (fused)": 4 * V * H} if head_trains else {}
    if not fused:
        stats = 24  # per row: four fp32 statistics and the argmax (int64)
        saved = N * (a * V + stats) + (N * a * H if head_trains else 0)  # a trained head keeps its input
        return _LossTerm(
            "logits and row statistics (logits path)",
            saved,
            {"logits and row statistics (logits path)": saved, **_row_blocks(s, N, forward_copies, window)},
            {"logits gradient": N * a * V, **_row_blocks(s, N, 1), **head_grad},
        )
    elements = _IHL_CPU_CHUNK_ELEMENTS if s.device == "cpu" else _IHL_CHUNK_ELEMENTS
    chunk = {"logits chunk": a * V * min(N, max(1, elements // V))}
    if kind == "seq_logprob":  # the per-token reduction recomputes each chunk in its backward
        saved = N * (a * H + 32)
        return _LossTerm(
            "last hidden states and row statistics (fused, per token)",
            saved,
            {
                "last hidden states and row statistics": saved,
                **chunk,
                **_row_blocks(s, N, forward_copies, window),
            },
            {"∂L/∂h": N * a * H, **chunk, **_row_blocks(s, N, 1), **fp32_head, **head_grad},
        )
    return _LossTerm(
        "∂L/∂h formed in the forward (fused)",
        N * a * H + (4 * V * H if head_trains else 0),
        {
            "last hidden states": N * a * H,
            "∂L/∂h being formed (fused)": N * a * H,
            **fp32_head,
            **chunk,
            **_row_blocks(s, N, forward_copies, window),
        },
        {"∂L/∂h × grad_output": N * a * H, **fp32_head, **head_grad},
    )


def _eval_terms(s: _Setup, fused: bool, N: int) -> dict[str, int]:
    """Teacher-forced metrics of an evaluation batch of ``N`` tokens (no gradient): per-token NLL and
    hits computed at the output head a chunk at a time for the labelled positions (gathered first; the
    plan counts every token as labelled, the upper bound), or from the model's logits."""
    a, H, V = s.a, s.shape.hidden, s.shape.vocab
    copies = 2 + (1 if a != 4 else 0)
    if fused:
        elements = _IHL_CPU_CHUNK_ELEMENTS if s.device == "cpu" else _IHL_CHUNK_ELEMENTS
        return {
            "eval: last hidden states": N * a * H,
            # Only the labelled positions reach the head: their rows, gathered (at most every token).
            "eval: labelled rows' hidden states": N * a * H,
            "eval: logits chunk": a * V * min(N, max(1, elements // V)),
            "eval: per-token NLL, hits and row statistics": N * 40,
            **_row_blocks(s, N, copies),
        }
    return {
        "eval: logits (logits path)": N * a * V,
        "eval: per-token NLL, hits, argmax and row statistics": N * 40,
        **_row_blocks(s, N, copies),
    }


def _fila_workspace(s: _Setup, solver: str) -> tuple[int, str]:
    """Peak bytes of FILA's fp32 work on the largest target layer, and which step it is."""
    out, n_in = max((s.shape.linears()[t] for t in s.targets), key=lambda shape: shape[0] * shape[1])
    mn, small, large = out * n_in, min(out, n_in), max(out, n_in)
    # W in fp32, F_r + ε and the ratio; on an accelerator also F_f and F_r, brought from the host.
    ratio = (5 if s.device == "cuda" else 3) * 4 * mn
    if solver == "svd":
        # A copy of the input (LAPACK overwrites it), U and Vᵀ. MKL allocates its work arrays itself
        # (outside PyTorch's allocator); cuSOLVER's comes from the allocator: estimated min(m, n)² floats.
        solve = 4 * (mn + small * (out + n_in) + (small * small if s.device == "cuda" else 0))
    elif solver == "randomized":
        solve = 4 * (3 * s.rank * (out + n_in) + s.rank * s.rank)  # torch.svd_lowrank(q=r): thin blocks
    else:
        # fisher.solver's Krylov basis and T (allocated up front), eigh of T (vectors and work), the
        # basis in fp64, a 64 MiB fp64 chunk of A and B = U_bᵀA with its SVD: an upper bound.
        block = s.rank + min(max(s.rank, 8), 64)
        cap = min(small, _SOLVER_MAX_ITERS * block)
        solve = 4 * small * cap + 4 * 8 * cap * cap + 8 * small * cap + _SOLVER_CHUNK_BYTES
        solve += 2 * 8 * block * (large + small)
    during_solve = 3 * 4 * mn + solve  # W, the ratio and diag(d)·W stay alive while it runs
    # The finiteness check of W_res = W − s·B₀A₀: isfinite is (x == x)·(|x| != inf), so |W_res| and
    # three boolean masks join W and W_res.
    check = 4 * mn * 2 + 4 * mn + 3 * mn
    steps = {"ratio F_f/(F_r + ε)": ratio, f"{solver} solver": during_solve, "finite check of W_res": check}
    step = max(steps, key=steps.__getitem__)
    return steps[step], f"layer {out}×{n_in}: {step}"


FORGET_RETAIN = ("forget", "retain")


def _fisher_groups(shape: ModelShape, targets: Sequence[str], budget: int) -> tuple[int, int]:
    """The groups of :func:`fastunlearn.fisher.fila_row_weights`: greedy runs of consecutive target
    layers whose fp32 forget and retain accumulators (8 bytes a weight) fit ``budget`` bytes. Returns
    (bytes of one fp32 accumulator set of the largest group, number of groups = passes over each set)."""
    sizes = [
        8 * out * n_in for _ in range(shape.layers) for out, n_in in (shape.linears()[t] for t in targets)
    ]
    if max(sizes) > budget:
        raise ValueError(
            f"fisher_memory {budget} bytes is less than the largest layer's fp32 forget and retain "
            f"accumulators ({max(sizes)} bytes)"
        )
    groups, current, largest = 1, 0, 0
    for size in sizes:
        if current + size > budget:
            groups, current = groups + 1, 0
        current += size
        largest = max(largest, current)
    return largest // 2, groups


def _check_int(name: str, value: Any, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {list(allowed)}")


def plan_memory(
    config: str | os.PathLike | Mapping[str, Any] | Any,
    *,
    batch_size: int = 4,
    max_length: int = 512,
    rank: int = 32,
    init: str = "fila",
    method: str = "ihl",
    gradient_checkpointing: bool = False,
    fused_linear: bool = True,
    dtype: str = "bfloat16",
    fisher: str = "streamed",
    fisher_memory: int | None = None,
    fisher_batch_size: int = 4,
    fila_solver: str = "truncated",
    evaluate: bool = True,
    eval_batch_size: int = 16,
    merge: bool = False,
    target_modules: Sequence[str] | None = None,
    padded: bool = True,
    world_size: int = 1,
    engine: str = "none",
    device: str = "cuda",
    context_bytes: int = DEFAULT_CONTEXT_BYTES,
) -> MemoryPlan:
    """Predicted peak bytes of each phase of :func:`fastunlearn.unlearn` on one rank (module docstring).

    Args mirror :class:`fastunlearn.UnlearnConfig` where they exist (``batch_size`` per device, for the
    forget batch and its paired retain batch each; ``rank`` = ``lora_r``; ``dtype`` the weights' and
    autocast's dtype). Others:
        fisher: ``"streamed"`` (accumulators for groups of layers within ``fisher_memory`` bytes,
            default 4 GiB; checkpointing follows ``gradient_checkpointing``) or ``"all_layers"``
            (today's :func:`~fastunlearn.estimate_fisher`: every accumulator at once, no checkpointing).
        fused_linear: the loss terms computed at the output head without the logits (``unlearn``'s
            default, every method); ``False`` plans ``unlearn(fused=False)`` / ``--no-fused``, the
            logits path, in every phase (training, the Fisher passes, the evaluations).
        fila_solver: ``"truncated"`` (the default), ``"svd"`` or ``"randomized"``
            (:mod:`fastunlearn.fisher.solver`).
        target_modules: suffixes of the adapted linears (default all seven, peft's ``"all-linear"``).
        padded: batches carry a padding mask (TOFU's do): the mask is kept per layer, and grouped-query
            attention expands ``k``/``v``.
        engine, world_size: ``"none"`` (one device), ``"ddp"``, ``"fsdp"``, ``"zero3"``.
        device: ``"cuda"`` (Triton kernels, foreach AdamW) or ``"cpu"`` (the PyTorch paths; for
            comparing with CPU measurements).
        context_bytes: the CUDA-context allowance added in :attr:`MemoryPlan.device_bytes`.
    """
    shape = model_shape(config)
    for name, value in (
        ("batch_size", batch_size),
        ("rank", rank),
        ("fisher_batch_size", fisher_batch_size),
        ("eval_batch_size", eval_batch_size),
        ("world_size", world_size),
    ):
        _check_int(name, value)
    _check_int("max_length", max_length, 2)
    _choice("init", init, INITS)
    _choice("method", method, METHODS)
    _choice("dtype", dtype, tuple(_DTYPES))
    _choice("fisher", fisher, FISHER_MODES)
    _choice("fila_solver", fila_solver, SOLVERS)
    _choice("engine", engine, ENGINES)
    _choice("device", device, DEVICES)
    if engine == "none" and world_size != 1:
        raise ValueError(
            f"engine 'none' runs on one device; world_size {world_size} needs ddp, fsdp or zero3"
        )
    if fisher_memory is not None:
        _check_int("fisher_memory", fisher_memory)
    _check_int("context_bytes", context_bytes, 0)
    targets = tuple(_LINEARS if target_modules is None else target_modules)
    unknown = sorted(set(targets) - set(_LINEARS))
    if unknown or not targets:
        raise ValueError(f"target_modules {unknown or list(targets)} are not among {list(_LINEARS)}")
    if rank > min(min(s) for s in (shape.linears()[t] for t in targets)):
        raise ValueError(f"LoRA rank {rank} exceeds the smallest dimension of a target layer")
    w, a = _DTYPES[dtype]
    s = _Setup(shape, targets, rank, max_length, w, a, padded, device)
    settings = {
        "batch_size": batch_size,
        "max_length": max_length,
        "rank": rank,
        "init": init,
        "method": method,
        "gradient_checkpointing": gradient_checkpointing,
        "fused_linear": fused_linear,
        "dtype": dtype,
        "fisher": fisher,
        "fisher_memory": fisher_memory if fisher_memory is not None else DEFAULT_FISHER_MEMORY,
        "fisher_batch_size": fisher_batch_size,
        "fila_solver": fila_solver,
        "evaluate": evaluate,
        "eval_batch_size": eval_batch_size,
        "merge": merge,
        "target_modules": list(targets),
        "padded": padded,
        "world_size": world_size,
        "engine": engine,
        "device": device,
    }
    phases = _phases(s, settings)
    return MemoryPlan(shape, settings, tuple(phases), context_bytes, _plan_notes(s, settings))


def _residency(s: _Setup, engine: str, world: int) -> tuple[dict[str, int], dict[str, int]]:
    """Weights resident on one rank, and what a sharded engine gathers while the model runs."""
    m, w = s.shape, s.w
    total = w * m.num_params()
    if engine in ("none", "ddp"):
        return {"weights": total}, {}
    embed = w * m.vocab * m.hidden
    root = embed * (1 if m.tied else 2) + w * m.hidden
    gathered = 2 * w * m.layer_params() + (root if engine == "fsdp" else embed)
    return {f"weights (1/{world} shard)": math.ceil(total / world)}, {
        "gathered layers and root modules": gathered
    }


def _phases(s: _Setup, settings: dict[str, Any]) -> list[Phase]:
    m, a, w = s.shape, s.a, s.w
    engine, world, init, method = (
        settings["engine"],
        settings["world_size"],
        settings["init"],
        settings["method"],
    )
    sharded = engine in ("fsdp", "zero3")
    shard = (lambda x: math.ceil(x / world)) if sharded else (lambda x: x)
    n = m.lora_params(s.rank, s.targets) if init != "full" else 0
    # ``weights``: resident; ``running``: the same while the model runs (plus gathered units).
    weights, gathered = _residency(s, engine, world)
    running = {**weights, **gathered}
    lora = {"LoRA parameters (fp32)": shard(4 * n)} if n else {}
    # fastunlearn's FSDP (training.fsdp) shards the model after FILA: until then, through loading, the
    # first evaluation, the Fisher passes and FILA, every rank holds it whole. ZeRO-3 creates it sharded.
    if engine == "fsdp":
        before = {"weights (whole until FILA)": w * m.num_params()}
        before_lora = {"LoRA parameters (fp32)": 4 * n} if n else {}
    else:
        before, before_lora = running, lora
    phases: list[Phase] = []

    def phase(name: str, moments: dict[str, dict[str, int]], notes: Sequence[str] = ()) -> None:
        kept = {label: {k: int(v) for k, v in terms.items() if v} for label, terms in moments.items()}
        phases.append(Phase(name, kept, tuple(notes)))

    phase("load", {"weights loaded": dict(weights if engine != "fsdp" else before)})

    # Training state, resident from the first step to the end (the trainer is referenced until return).
    if init == "full":
        grad_bytes = shard(w * m.num_params())
        trained = {"gradients": grad_bytes, "AdamW moments": shard(2 * w * m.num_params())}
        step_extra = shard(w * m.num_params()) if engine == "ddp" else 0
    else:
        grad_bytes = shard(4 * n)
        trained = {"LoRA gradients (fp32)": grad_bytes, "AdamW moments (fp32)": shard(8 * n)}
        step_extra = 4 * n if engine == "ddp" else 0
    # Autocast's bf16 copies of the adapter weights live as long as a saved tensor refers to them:
    # all of them without checkpointing; with it, only inside the autocast region (its cache).
    copies = a * n if (a != 4 and n) else 0
    checkpointing = settings["gradient_checkpointing"]
    autocast_copies = {"autocast copies of the adapters": copies} if copies and not checkpointing else {}
    regime = "full" if init == "full" else "lora"

    N = settings["batch_size"] * s.T
    retain = method in _NEEDS_RETAIN
    fused = settings["fused_linear"]
    if checkpointing:
        acts = N * _checkpointed_per_token(s) + _rng_states(s)
        # The recomputed layer's saved tensors (its adapters' autocast copies are not among what is
        # live at the peak: measured at Llama-2-7B width and below).
        recompute = {"one layer recomputed": N * _saved_per_token(s, regime)}
        acts_label = "checkpointed layer inputs"
    else:
        acts = N * m.layers * _saved_per_token(s, regime)
        recompute = {}
        acts_label = "saved activations"
    seq_logprob = ("npo", "npo+gd", "npo+kl", "simnpo", "dpo")
    forget_kind = "ihl" if method == "ihl" else "seq_logprob" if method in seq_logprob else "nll"
    forget = _loss_term(s, forget_kind, fused, N, head_trains=init == "full")
    retain_term = _loss_term(s, "nll", fused, N, head_trains=init == "full")
    forget_label = f"forget: {forget.saved_label}"
    static = {**running, **lora, **trained, **autocast_copies}
    if step_extra:
        static["DDP gradient buckets"] = step_extra
    # Inside the autocast region its cache holds every adapter's bf16 copy, checkpointing or not
    # (without checkpointing they are saved tensors, already in ``static``).
    cached = {"autocast copies of the adapters (cached in the forward)": copies} if checkpointing else {}
    forget_graph = {f"{acts_label}, forget batch": acts}
    graphs = {**forget_graph, **({f"{acts_label}, retain batch": acts} if retain else {})}
    # Both forwards use every trained weight, so each weight's gradient accumulator waits for two
    # gradients: the retain graph's — differentiated first — is held, in the weight's dtype, until the
    # forget graph's arrives, for every layer at once while the forget graph is differentiated.
    # accelerate autocasts each model call on its own (Trainer's bf16), so each forward casts the
    # adapters itself and the wait is at the fp32 leaf (one autocast region around both forwards
    # would share the cached bf16 copies and wait in bf16 instead). Measured in
    # tests/test_memory_plan.py; under FSDP/ZeRO-3 modelled as the sharded gradients.
    awaiting = {"retain gradients awaiting the forget graph": grad_bytes} if retain else {}
    moments = {
        "forget loss forward": {**static, **cached, **forget_graph, **forget.forward_terms("forget")},
        "forget loss backward": {
            **static,
            **forget_graph,
            **awaiting,
            forget_label: forget.saved,
            **forget.backward_terms("forget"),
        },
        "top layer backward": {
            **static,
            **graphs,
            # the forget loss's tensors are freed by now unless the retain graph goes first
            forget_label: forget.saved if retain else 0,
            **recompute,
            "layer backward working set": N * _layer_backward_per_token(s),
        },
        "optimizer step": {
            **static,
            "AdamW foreach temporaries": (
                shard(4 * n if init != "full" else 4 * m.num_params())
                if s.device == "cuda"
                else 12 * (m.vocab * m.hidden if init == "full" else s.rank * max(m.hidden, m.intermediate))
            ),
        },
    }
    if retain:
        # The forget graph's top layer, after the retain graph is done: its activations are freed,
        # its gradients are waiting.
        moments["forget graph's top layer backward"] = {
            **static,
            **forget_graph,
            **awaiting,
            **recompute,
            "layer backward working set": N * _layer_backward_per_token(s),
        }
        if checkpointing and m.layers > 1:
            # The retain graph's first layer, the last it differentiates: of the retain graph only that
            # layer's input is left, and every layer above has left its gradients waiting.
            moments["retain graph's first layer backward"] = {
                **static,
                **forget_graph,
                forget_label: forget.saved,
                "checkpointed layer input, retain batch (first layer)": N * a * m.hidden
                + _rng_states(s) // m.layers,
                "retain gradients awaiting the forget graph (layers above)": grad_bytes
                * (m.layers - 1)
                // m.layers,
                **recompute,
                "layer backward working set": N * _layer_backward_per_token(s),
            }
        moments["retain loss forward"] = {
            **static,
            **cached,
            **graphs,
            forget_label: forget.saved,
            **retain_term.forward_terms("retain"),
        }
        moments["retain loss backward"] = {
            **static,
            **graphs,
            forget_label: forget.saved,
            f"retain: {retain_term.saved_label}": retain_term.saved,
            **retain_term.backward_terms("retain"),
        }
    train_moments = moments

    if settings["evaluate"]:
        Ne = settings["eval_batch_size"] * s.T
        state = {**static}
        for key in ("LoRA gradients (fp32)", "gradients", "DDP gradient buckets"):
            state.pop(key, None)  # set to None after the last step
        for key in list(state):
            if key.startswith("autocast"):
                state.pop(key)
        # Inside a decoder layer (no gradient): the residual stream and the MLP's intermediates; at the
        # output head, the metrics' terms (from the logits under --no-fused).
        decoder = {
            "residual stream": Ne * a * m.hidden,
            "decoder working set": Ne * max(3 * a, a + 4) * m.intermediate,
        }
        phase(
            "evaluate",
            {
                "before training, decoder layer": {**before, **decoder},
                "before training, output head": {**before, **_eval_terms(s, fused, Ne)},
                "after training, decoder layer": {**state, **decoder},
                "after training, output head": {**state, **_eval_terms(s, fused, Ne)},
            },
            [f"eval batch {settings['eval_batch_size']}×{s.T} tokens"],
        )

    if init == "fila":
        Nf = settings["fisher_batch_size"] * s.T
        total_acc = 4 * m.linear_params(s.targets)
        if settings["fisher"] == "all_layers":
            passes, f_acts = 1, Nf * m.layers * _saved_per_token(s, "inputs")
            f_recompute = {}
            f_label = "saved activations and kept inputs"
            accumulators = {
                what: {"fp32 accumulators, every target layer": total_acc} for what in FORGET_RETAIN
            }
        else:
            budget = settings["fisher_memory"]
            # fila_row_weights: a group's forget sums are kept through its retain pass.
            group, passes = _fisher_groups(m, s.targets, budget)
            of_group = f"one group of layers (budget {budget / GiB:.2f} GiB)"
            accumulators = {
                "forget": {f"fp32 forget accumulators, {of_group}": group},
                "retain": {
                    f"fp32 forget sums, {of_group}": group,
                    f"fp32 retain accumulators, {of_group}": group,
                },
            }
            if checkpointing:
                f_acts = Nf * _checkpointed_per_token(s) + _rng_states(s)
                f_recompute = {"one layer recomputed": Nf * _saved_per_token(s, "inputs")}
                f_label = "checkpointed layer inputs"
            else:
                f_acts, f_recompute = Nf * m.layers * _saved_per_token(s, "inputs"), {}
                f_label = "saved activations and kept inputs"
        f_static = {**before, **before_lora}
        # The CPU path's buffers (fastunlearn.fisher._grad_sq_torch): per-example gradients of as many
        # examples as fit in 8 MiB (at least one) and their fp32 sum, for the largest layer.
        largest = max(out * n_in for out, n_in in (m.linears()[t] for t in s.targets))
        chunk = min(settings["fisher_batch_size"], max(1, _FISHER_TORCH_BUFFER // (4 * largest)))
        backend = {"per-example gradient buffers (CPU path)": 4 * largest * (chunk + 1)}
        if s.device == "cuda":
            backend = {}
        # The pass's NLL (sum over the batch): at the output head, or from the logits under --no-fused.
        f_loss = _loss_term(s, "nll", fused, Nf)
        notes = [f"{passes} pass(es) over the data, batches of {settings['fisher_batch_size']}×{s.T}"]
        if settings["fisher"] == "all_layers" and settings["gradient_checkpointing"]:
            notes.append("estimate_fisher cannot checkpoint (its hooks would see each layer twice)")
        for what in FORGET_RETAIN:
            f_base = {**f_static, **accumulators[what], f_label: f_acts}
            fisher_moments = {
                "loss forward": {**f_base, **f_loss.forward_terms("NLL")},
                "loss backward": {
                    **f_base,
                    f"NLL: {f_loss.saved_label}": f_loss.saved,
                    **f_loss.backward_terms("NLL"),
                },
                "top layer backward": {
                    **f_base,
                    **f_recompute,
                    "layer backward working set": Nf * _layer_backward_per_token(s),
                    **backend,
                },
            }
            phase(f"fisher_{what}", fisher_moments, notes)
        workspace, step = _fila_workspace(s, settings["fila_solver"])
        fila_static = {**weights, **lora} if engine != "fsdp" else {**before, **before_lora}
        if engine == "zero3":
            fila_static["gathered layer"] = w * m.layer_params()
        fila_moment = {**fila_static, "fp32 workspace of one layer": workspace}
        if s.device == "cpu":  # the records of A₀, B₀ go to the host: on a CPU run, the same memory
            fila_moment["FILA records A0, B0 (fp32, host)"] = 4 * n
        phase("fila", {step: fila_moment})

    phase("train_step", train_moments)

    save_state = {**weights, **lora}
    save_state.update({k: v for k, v in trained.items() if "moments" in k})
    if init == "full":
        save_moment = {**save_state}
    else:
        save_moment = {**save_state, "rank-2r export [B, -B0], [A; A0] (fp32)": 8 * n}
    if settings["merge"]:
        largest = max(out * n_in for out, n_in in (m.linears()[t] for t in s.targets))
        save_moment["merging one layer (fp32)"] = 2 * 4 * largest
    phase("save", {"export": save_moment})
    return phases


def _plan_notes(s: _Setup, settings: dict[str, Any]) -> tuple[str, ...]:
    notes = [
        "peaks are live tensor bytes (torch.cuda.max_memory_allocated); allocator fragmentation is not "
        "modelled",
        f"activations for full-length batches of {s.T} tokens" + (" with a padding mask" if s.padded else ""),
    ]
    if settings["init"] == "fila" and settings["fisher"] == "streamed":
        notes.append(
            "fisher='streamed' (unlearn's fisher_memory; modelled, not measured): accumulators for "
            "one group of layers per pass"
            + (", with checkpointing" if settings["gradient_checkpointing"] else "")
        )
    if settings["engine"] == "zero3":
        notes.append("Fisher accumulators are not sharded; FILA gathers one layer at a time")
    if settings["engine"] == "fsdp":
        notes.append("fsdp: the model is sharded after FILA (whole on every rank until then)")
    return tuple(notes)
