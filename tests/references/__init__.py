"""fp64 references written plainly from the formulas: the oracles the tests compare every path with.

``references.formulations`` re-exports the eager formulations that the benchmarks time
(``benchmarks/_formulations.py``), for the tests that check those.
"""
