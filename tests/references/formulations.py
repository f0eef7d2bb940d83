"""The benchmarks' eager formulations (``benchmarks/_formulations.py``), importable from the tests.

They live with the benchmarks, which time them as baselines and may not import the tests; this is the
one place that puts ``benchmarks/`` on the import path for the tests that check or reuse them.
"""

from __future__ import annotations

import sys
from pathlib import Path

_BENCHMARKS = str(Path(__file__).resolve().parents[2] / "benchmarks")
if _BENCHMARKS not in sys.path:
    sys.path.append(_BENCHMARKS)

from _formulations import (  # noqa: E402
    ihl_paper_formulation,
    ihl_reference,
    per_example_grad_sq_reference,
)

__all__ = ["ihl_paper_formulation", "ihl_reference", "per_example_grad_sq_reference"]
