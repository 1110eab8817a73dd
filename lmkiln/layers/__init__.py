"""Model building blocks over lmkiln's kernels."""

from lmkiln.layers.linear import Int4GateUpSiLU, Int4Linear

__all__ = ["Int4GateUpSiLU", "Int4Linear"]
