"""Analyses of token codes that explain PAR's design: `dependency` (conditional entropies between image tokens,
the paper's appendix D)."""
