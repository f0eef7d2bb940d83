"""Code shared by the tests: tiny models (``models``), fp64 oracles and comparisons (``oracles``), the
Fisher tests' model and batches (``fisher``), the objectives' references (``methods``), real
tokenizer families trained offline (``tokenizers``) and a saved model with data files for end-to-end
runs (``workspace``).

``tests/`` is on ``sys.path`` (pytest's ``pythonpath``), so tests import ``helpers.models`` and so on;
test modules never import each other.
"""
