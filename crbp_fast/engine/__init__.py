"""The fixed-point engine, for any module ``f(x, h) -> h``: the four training algorithms
(:mod:`.fixed_point`), the forward and adjoint solvers (:mod:`.solvers`) and the Lipschitz
Coefficient Penalty (:mod:`.lcp`)."""

from .fixed_point import ADJOINT_RULES, ADJOINT_SOLVERS, ALGORITHMS, SOLVERS, FixedPointResult, FixedPointStats, fixed_point
from .lcp import lcp_penalty
from .solvers import AdjointDivergenceWarning

__all__ = [
    "ADJOINT_RULES", "ADJOINT_SOLVERS", "ALGORITHMS", "SOLVERS", "AdjointDivergenceWarning", "FixedPointResult",
    "FixedPointStats", "fixed_point", "lcp_penalty",
]
