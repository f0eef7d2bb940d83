"""Test oracles: the quantities of fastunlearn written plainly from their formulas, in fp64."""
