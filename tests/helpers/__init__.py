"""Code shared by the tests: tiny models (``models``), fp64 oracles and comparisons (``oracles``), the
Fisher tests' model and batches (``fisher``) and the objectives' references (``methods``).

``tests/`` is on ``sys.path`` (pytest's ``pythonpath``), so tests import ``helpers.models`` and so on;
test modules never import each other.
"""
