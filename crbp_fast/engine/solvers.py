"""Fixed-point solvers shared by the forward iteration and the adjoint equation.

- :func:`anderson`: Anderson acceleration (type II, with damping) of x = G(x) for a batch of
  independent problems, each a row of a (P, D) matrix.
- :func:`neumann_adjoint`: the Neumann series g = sum_k (J^T)^k v of the adjoint equation
  g = v + J^T g, with a relative tolerance, a divergence guard, or the published stopping rules.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


@dataclass
class SolveResult:
    """The solution, iterations run (evaluations of G or J^T), final relative residual, and why it stopped."""

    solution: Tensor
    iterations: int
    residual: float
    stop: str  # "tol", "max_steps", "diverged", "published"


class AdjointDivergenceWarning(RuntimeWarning):
    """The adjoint iteration grew instead of converging: the cell is not contractive at h*."""


def _rel_t(num: Tensor, den: Tensor) -> Tensor:
    """num / den as a device tensor (0 / 0 = 0, x / 0 = inf), without a host synchronisation."""
    num, den = num.detach(), den.detach()
    return torch.where(den > 0, num / den.clamp_min(1e-300 if den.dtype == torch.float64 else 1e-38),
                       torch.where(num == 0, torch.zeros_like(num), torch.full_like(num, math.inf)))


def _rel(num: Tensor, den: Tensor) -> float:
    d = float(den)
    return float(num) / d if d > 0 else (0.0 if float(num) == 0 else math.inf)


#: A term ||(J^T)^k v|| this many times ||v_0|| ends the series as diverged at once. A contractive
#: but non-normal J can make the terms grow for a while before they shrink (transient growth), so
#: growth alone is not divergence; a gradient series whose terms reach 1e4 x the first is no
#: gradient estimate either way.
GROWTH_LIMIT = 1e4


def _diverged(
    vjp: Callable[[Tensor], Tensor], v0: Tensor, max_steps: int, why: str, iterations: int,
) -> SolveResult:
    """The decided result of a diverged adjoint: warn, and return the best partial Neumann sum.

    "Best" is the partial sum v_0 + ... + v_b at the iteration b where ||v_b|| was smallest (the
    smallest omitted-term estimate; b = 0, i.e. dL/dh_N itself, when the terms only grew). It is
    finite and bounded, never the diverging sum, so it cannot hand the optimizer a 1e18 or NaN
    step; the stats say ``"diverged"`` so a trainer or a user can tell it from a converged one.
    The partial sums are re-run here (only on this failure path) so the fast paths keep no copies.
    """
    norm_v0 = float(v0.norm())
    g, v = v0, v0
    best_nv, best_g, best_k = norm_v0, v0, 0
    for k in range(1, max_steps + 1):
        v = vjp(v)
        nv = float(v.norm())
        if not math.isfinite(nv) or nv > GROWTH_LIMIT * max(norm_v0, 1e-300):
            break
        g = g + v
        if nv < best_nv:
            best_nv, best_g, best_k = nv, g, k
    warnings.warn(
        f"adjoint: {why}; the cell is not contractive at the fixed point. Returning the best partial "
        f"Neumann sum (iteration {best_k}, where ||(J^T)^k v|| was smallest) instead of a diverging "
        f"gradient; consider the LCP penalty (algorithm='crbp'), or more adjoint_steps if the terms "
        f"grow only for a while",
        AdjointDivergenceWarning, stacklevel=4,
    )
    return SolveResult(best_g, iterations, _rel(best_nv, best_g.norm()), "diverged")


def neumann_adjoint(
    vjp: Callable[[Tensor], Tensor], v0: Tensor, *, max_steps: int, tol: float,
    rule: str = "relative", trace: list[Tensor] | None = None,
) -> SolveResult:
    """g = v0 + J^T v0 + (J^T)^2 v0 + ... with ``vjp(v) = J^T v``.

    rule "relative": stop once ||v_k|| / ||g|| < tol (tol = 0: run exactly ``max_steps``, with
    no host synchronisation per iteration). The series has diverged when a term turns
    non-finite, when a term exceeds ``GROWTH_LIMIT`` x ||v_0||, or when the budget ends with the
    last term larger than the first (it never started to shrink); a diverged series warns and
    returns the best partial sum (see :func:`_diverged`), never the diverging one. Terms that grow
    for a few iterations and then shrink (a contractive, non-normal J) are not divergence.
    rule "published": the published code's scale-dependent rules: stop (discarding the last
    term) when ||g|| > 1, when ||v_k|| grows, or when ||v_k|| < 1e-9.

    ``trace``: a list that receives, at each iteration k, the relative residual ||v_k|| / ||g_k||
    as a 0-d device tensor (no host synchronisation; the caller stacks them at the end).
    """
    g = v0
    v = v0
    if max_steps == 0:
        return SolveResult(g, 0, math.nan, "max_steps")
    norm_v0 = v0.norm()
    if rule == "published":
        prev_nv = norm_v0
        for k in range(1, max_steps + 1):
            v = vjp(v)
            nv = v.norm()
            if trace is not None:
                trace.append(_rel_t(nv, (g + v).norm()))
            if not torch.isfinite(nv):
                return _diverged(vjp, v0, k, f"non-finite J^T v at iteration {k}", k)
            g_new = g + v
            if g_new.norm() > 1 or nv > prev_nv or nv < 1e-9:
                return SolveResult(g, k, _rel(nv, g.norm()), "published")
            g, prev_nv = g_new, nv
        return SolveResult(g, max_steps, _rel(v.norm(), g.norm()), "max_steps")
    limit = GROWTH_LIMIT * float(norm_v0)
    for k in range(1, max_steps + 1):
        v = vjp(v)
        g = g + v
        if trace is not None:
            trace.append(_rel_t(v.norm(), g.norm()))
        if tol == 0:
            continue
        nv = float(v.norm())
        if not math.isfinite(nv):
            return _diverged(vjp, v0, k, f"non-finite J^T v at iteration {k}", k)
        if nv > limit:
            return _diverged(vjp, v0, k, f"||(J^T)^k v|| reached {nv:.3g} from {float(norm_v0):.3g} at iteration {k}", k)
        res = _rel(nv, g.norm())
        if res < tol:
            return SolveResult(g, k, res, "tol")
    # One more product would cost a VJP; the size of the last term is the residual estimate.
    nv = float(v.norm())
    if not (math.isfinite(nv) and bool(torch.isfinite(g).all())):
        return _diverged(vjp, v0, max_steps, f"the sum is non-finite after {max_steps} iterations", max_steps)
    if nv > float(norm_v0):
        return _diverged(
            vjp, v0, max_steps,
            f"after {max_steps} iterations ||(J^T)^k v|| is {nv:.3g} against {float(norm_v0):.3g} at the start",
            max_steps,
        )
    return SolveResult(g, max_steps, _rel(nv, g.norm()), "max_steps")


def anderson(
    fn: Callable[[Tensor], Tensor], x0: Tensor, *, max_steps: int, tol: float = 0.0,
    window: int = 5, damping: float = 1.0, reg: float = 1e-8, trace: list[Tensor] | None = None,
) -> tuple[Tensor, Tensor, int]:
    """Anderson acceleration of x = fn(x) for P independent problems, x0 of shape (P, D).

    Each iteration evaluates fn once and mixes the last ``window`` iterates with the weights
    that minimise the combined residual (a small regularised least-squares problem per row).
    Stops after ``max_steps`` evaluations, or once every row's relative residual
    ||fn(x) - x|| / ||fn(x)|| is below ``tol`` (tol > 0).

    ``trace``: a list that receives, after each evaluation, the per-row relative residual
    ||fn(x) - x|| / ||fn(x)|| of the evaluated iterate, shape (P,), as device tensors (no host
    synchronisation; the caller stacks them).

    Returns (x, fn(x) evaluated at the returned x, evaluations run).
    """
    p, d = x0.shape
    m = max(1, window)
    xs = x0.new_zeros(p, m, d)
    fs = x0.new_zeros(p, m, d)
    x = x0
    fx = fn(x)
    evals = 1
    xs[:, 0], fs[:, 0] = x, fx
    k = 1

    def residual() -> Tensor:
        return ((fx - x).norm(dim=1) / fx.norm(dim=1).clamp_min(1e-30)).detach()

    res = residual() if (tol > 0 or trace is not None) else None
    if trace is not None:
        trace.append(res)
    while evals < max_steps:
        if tol > 0:
            if bool((res < tol).all()):
                break
        n = min(k, m)
        gdiff = fs[:, :n] - xs[:, :n]  # residuals of the stored iterates, (P, n, D)
        # min ||sum a_i g_i|| s.t. sum a_i = 1, through the normal equations with a Lagrange row.
        gram = torch.bmm(gdiff, gdiff.transpose(1, 2))
        scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-30)
        gram = gram + (reg * scale)[:, None, None] * torch.eye(n, dtype=x0.dtype, device=x0.device)
        a = x0.new_zeros(p, n + 1, n + 1)
        a[:, 0, 1:] = 1
        a[:, 1:, 0] = 1
        a[:, 1:, 1:] = gram
        rhs = x0.new_zeros(p, n + 1, 1)
        rhs[:, 0] = 1
        coef = torch.linalg.solve(a, rhs)[:, 1:, 0]  # (P, n)
        mixed_f = torch.bmm(coef[:, None], fs[:, :n])[:, 0]
        if damping != 1.0:
            mixed_x = torch.bmm(coef[:, None], xs[:, :n])[:, 0]
            x = damping * mixed_f + (1 - damping) * mixed_x
        else:
            x = mixed_f
        fx = fn(x)
        evals += 1
        xs[:, k % m], fs[:, k % m] = x, fx
        k += 1
        if tol > 0 or trace is not None:
            res = residual()
            if trace is not None:
                trace.append(res)
    return x, fx, evals


def anderson_adjoint(
    vjp: Callable[[Tensor], Tensor], v0: Tensor, *, max_steps: int, tol: float,
    window: int = 5, damping: float = 1.0, trace: list[Tensor] | None = None,
) -> SolveResult:
    """Anderson acceleration of the adjoint fixed point g = v0 + J^T g (one problem).

    ``trace`` receives the relative residual ||step(g) - g|| / ||step(g)|| of each iterate
    (0-d device tensors), step(g) = v0 + J^T g.
    """
    if max_steps == 0:
        return SolveResult(v0, 0, math.nan, "max_steps")
    shape = v0.shape

    def step(g_flat: Tensor) -> Tensor:
        return (v0 + vjp(g_flat.reshape(shape))).reshape(1, -1)

    rows: list[Tensor] | None = [] if trace is not None else None
    g, fg, evals = anderson(step, v0.reshape(1, -1), max_steps=max_steps, tol=tol, window=window, damping=damping,
                            trace=rows)
    if trace is not None:
        trace.extend(r[0] for r in rows)
    res = _rel((fg - g).norm(), fg.norm())
    if not math.isfinite(res) or res > 1.0:
        return _diverged(
            vjp, v0, max_steps, f"Anderson ended with relative residual {res:.3g} after {evals} iterations", evals,
        )
    # fg = v0 + J^T g is one Picard step past g: at least as accurate, at no extra cost.
    return SolveResult(fg.reshape(shape), evals, res, "tol" if tol > 0 and res < tol else "max_steps")
