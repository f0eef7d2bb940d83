"""Code shared by the tests: tiny models (``models``), fp64 oracles and comparisons (``oracles``), the
Fisher tests' model and batches (``fisher``), the objectives' references (``methods``) and real
tokenizer families trained offline (``tokenizers``).

``tests/`` is on ``sys.path`` (pytest's ``pythonpath``), so tests import ``helpers.models`` and so on;
test modules never import each other.
"""
