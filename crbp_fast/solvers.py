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


def _rel(num: Tensor, den: Tensor) -> float:
    d = float(den)
    return float(num) / d if d > 0 else (0.0 if float(num) == 0 else math.inf)


def neumann_adjoint(
    vjp: Callable[[Tensor], Tensor], v0: Tensor, *, max_steps: int, tol: float,
    rule: str = "relative", patience: int = 3,
) -> SolveResult:
    """g = v0 + J^T v0 + (J^T)^2 v0 + ... with ``vjp(v) = J^T v``.

    rule "relative": stop once ||v_k|| / ||g|| < tol (tol = 0: run exactly ``max_steps``); when
    ||v_k|| grows for ``patience`` iterations in a row past ||v_0||, or turns non-finite, warn
    and return the partial sum taken where ||v_k|| was smallest.
    rule "published": the published code's scale-dependent rules: stop (discarding the last
    term) when ||g|| > 1, when ||v_k|| grows, or when ||v_k|| < 1e-9.
    """
    g = v0
    v = v0
    if max_steps == 0:
        return SolveResult(g, 0, math.nan, "max_steps")
    check_each = tol > 0 or rule == "published"
    norm_v0 = v0.norm()
    prev_nv = norm_v0
    best_nv, best_g, best_k = norm_v0, g, 0
    grew = 0
    for k in range(1, max_steps + 1):
        v = vjp(v)
        if not check_each:
            g = g + v
            continue
        nv = v.norm()
        if not torch.isfinite(nv):
            warnings.warn(
                f"adjoint: non-finite J^T v at iteration {k}; returning the partial sum of "
                f"iteration {best_k}", AdjointDivergenceWarning, stacklevel=3,
            )
            return SolveResult(best_g, k, math.inf, "diverged")
        if rule == "published":
            g_new = g + v
            if g_new.norm() > 1 or nv > prev_nv or nv < 1e-9:
                return SolveResult(g, k, _rel(nv, g.norm()), "published")
            g, prev_nv = g_new, nv
            continue
        g = g + v
        res = _rel(nv, g.norm())
        if res < tol:
            return SolveResult(g, k, res, "tol")
        grew = grew + 1 if nv > prev_nv else 0
        if nv < best_nv:
            best_nv, best_g, best_k = nv, g, k
        if grew >= patience and nv > norm_v0:
            warnings.warn(
                f"adjoint: ||(J^T)^k v|| grew for {grew} iterations (to {float(nv):.3g} from "
                f"{float(norm_v0):.3g}); the cell is not contractive at the fixed point. Returning "
                f"the partial sum of iteration {best_k}; consider the LCP penalty (algorithm='crbp')",
                AdjointDivergenceWarning, stacklevel=3,
            )
            return SolveResult(best_g, k, res, "diverged")
        prev_nv = nv
    # One more product would cost a VJP; the size of the last term is the residual estimate.
    nv = v.norm()
    res = _rel(nv, g.norm())
    if not check_each and (not math.isfinite(res) or float(nv) > float(norm_v0) * 1e3):
        warnings.warn(
            f"adjoint: after {max_steps} iterations ||(J^T)^k v|| is {float(nv):.3g} against "
            f"{float(norm_v0):.3g} at the start: the Neumann series diverges",
            AdjointDivergenceWarning, stacklevel=3,
        )
        return SolveResult(g, max_steps, res, "diverged")
    return SolveResult(g, max_steps, res, "max_steps")


def anderson(
    fn: Callable[[Tensor], Tensor], x0: Tensor, *, max_steps: int, tol: float = 0.0,
    window: int = 5, damping: float = 1.0, reg: float = 1e-8,
) -> tuple[Tensor, Tensor, int]:
    """Anderson acceleration of x = fn(x) for P independent problems, x0 of shape (P, D).

    Each iteration evaluates fn once and mixes the last ``window`` iterates with the weights
    that minimise the combined residual (a small regularised least-squares problem per row).
    Stops after ``max_steps`` evaluations, or once every row's relative residual
    ||fn(x) - x|| / ||fn(x)|| is below ``tol`` (tol > 0).

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
    while evals < max_steps:
        if tol > 0:
            res = (fx - x).norm(dim=1) / fx.norm(dim=1).clamp_min(1e-30)
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
    return x, fx, evals


def anderson_adjoint(
    vjp: Callable[[Tensor], Tensor], v0: Tensor, *, max_steps: int, tol: float,
    window: int = 5, damping: float = 1.0,
) -> SolveResult:
    """Anderson acceleration of the adjoint fixed point g = v0 + J^T g (one problem)."""
    if max_steps == 0:
        return SolveResult(v0, 0, math.nan, "max_steps")
    shape = v0.shape

    def step(g_flat: Tensor) -> Tensor:
        return (v0 + vjp(g_flat.reshape(shape))).reshape(1, -1)

    g, fg, evals = anderson(step, v0.reshape(1, -1), max_steps=max_steps, tol=tol, window=window, damping=damping)
    res = _rel((fg - g).norm(), fg.norm())
    if not math.isfinite(res) or res > 1.0:
        warnings.warn(
            f"adjoint: Anderson ended with relative residual {res:.3g} after {evals} iterations; "
            "the adjoint equation has no stable solution at this point",
            AdjointDivergenceWarning, stacklevel=3,
        )
        return SolveResult(fg.reshape(shape), evals, res, "diverged")
    # fg = v0 + J^T g is one Picard step past g: at least as accurate, at no extra cost.
    return SolveResult(fg.reshape(shape), evals, res, "tol" if tol > 0 and res < tol else "max_steps")
