"""``fastunlearn plan``: the predicted peak device memory of an ``unlearn`` run, phase by phase.

Pure arithmetic on the model's config (:func:`fastunlearn.memory_plan.plan_memory`): no weights, no
PyTorch. MODEL_OR_CONFIG is a known name (``llama2-7b``, ``llama3-8b``, …), a ``config.json`` or the
model directory holding one.
"""

from __future__ import annotations

import argparse
import json

from fastunlearn.cli import summary
from fastunlearn.cli._args import option_flags

__all__ = ["add_parser"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``fastunlearn plan``."""
    from fastunlearn.memory_plan import ENGINES, INITS, KNOWN_MODELS, METHODS

    p = subparsers.add_parser(
        "plan",
        help=summary("plan"),
        description="Predict the peak device memory of each phase of `fastunlearn unlearn` on one device "
        "(load, evaluate, Fisher passes, FILA, a training step, save) from MODEL's config alone. "
        "Live tensors only (torch.cuda.max_memory_allocated); the CUDA context is added to the total.",
    )
    p.add_argument(
        "model",
        metavar="MODEL_OR_CONFIG",
        help=f"a known model ({', '.join(KNOWN_MODELS)}), a config.json or a model directory",
    )
    p.add_argument("--batch-size", type=int, default=4, help="per device (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=512, help="tokens per example (default: %(default)s)")
    p.add_argument("--rank", type=int, default=32, help="LoRA rank (default: %(default)s)")
    p.add_argument("--init", default="fila", choices=INITS, help="(default: %(default)s)")
    p.add_argument("--method", default="ihl", choices=METHODS, help="(default: %(default)s)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute layer activations")
    p.add_argument(
        "--fused",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="plan the loss terms computed at the output head without the logits, as unlearn computes "
        "them by default; --no-fused plans unlearn --no-fused (the logits path) (default: fused)",
    )
    p.add_argument("--world-size", type=int, default=1, help="devices (default: %(default)s)")
    p.add_argument("--engine", default="none", choices=ENGINES, help="(default: %(default)s)")
    p.add_argument("--terms", action="store_true", help="list each phase's terms under its row")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(
        func=_run_plan,
        option_flags=option_flags(p, {"fused_linear": "--fused", "config": "MODEL_OR_CONFIG"}),
    )
    return p


def _run_plan(args: argparse.Namespace) -> int:
    from fastunlearn.memory_plan import plan_memory

    plan = plan_memory(
        args.model,
        batch_size=args.batch_size,
        max_length=args.max_length,
        rank=args.rank,
        init=args.init,
        method=args.method,
        gradient_checkpointing=args.gradient_checkpointing,
        fused_linear=args.fused,
        world_size=args.world_size,
        engine=args.engine,
    )
    if args.json:
        phases = [{"name": p.name, "peak_bytes": p.peak_bytes} for p in plan.phases]
        print(
            json.dumps({"model": plan.model.name, "phases": phases, "peak_bytes": plan.peak_bytes}, indent=2)
        )
    else:
        print(plan.format_table(terms=args.terms))
    return 0
