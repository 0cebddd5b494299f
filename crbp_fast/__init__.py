"""crbp_fast: fused kernels and a fixed-point engine for recurrent vision models trained with C-RBP.

    from crbp_fast import HGRUCell, fixed_point, lcp_penalty
    cell = HGRUCell(channels=25, kernel_size=15)
    res = fixed_point(cell, x, steps=20, algorithm="crbp")
"""

from .cells import ConvGRUCell, ConvLSTMCell
from .engine.fixed_point import (
    ALGORITHMS, ENGINE_ALGORITHMS, FixedPointResult, FixedPointStats, FixedPointTrace, fixed_point,
)
from .hgru import HGRUCell
from .engine.lcp import lcp_penalty
from .engine.solvers import AdjointDivergenceWarning

__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS", "AdjointDivergenceWarning", "ConvGRUCell", "ConvLSTMCell", "ENGINE_ALGORITHMS",
    "FixedPointResult", "FixedPointStats", "FixedPointTrace", "HGRUCell",
    "fixed_point", "lcp_penalty", "__version__",
]
