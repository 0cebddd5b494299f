"""The fixed-point engine: run any recurrent step f(x, h) -> h with BPTT, C-BPTT, RBP or C-RBP.

| algorithm | forward                                  | backward                                    | memory in N |
| --------- | ---------------------------------------- | ------------------------------------------- | ----------- |
| bptt      | N steps with graph                       | autograd                                    | O(N)        |
| cbptt     | as bptt                                  | autograd, plus LCP at the last step         | O(N)        |
| rbp       | N-1 steps without graph, 1 tracked step  | adjoint g = dL/dh_N + J^T g, then 1 step    | O(1)        |
| crbp      | as rbp                                   | as rbp, plus LCP at the tracked step        | O(1)        |
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor

from ..conv.fft import SpectraScope
from .lcp import lcp_from_step
from .solvers import anderson, anderson_adjoint, neumann_adjoint

ALGORITHMS = ("bptt", "cbptt", "rbp", "crbp")
SOLVERS = ("iteration", "anderson")
ADJOINT_SOLVERS = ("neumann", "anderson")
ADJOINT_RULES = ("relative", "published")


@dataclass
class FixedPointStats:
    """What the forward solve did, and (filled in when backward runs) what the adjoint did."""

    algorithm: str
    solver: str
    steps: int  # evaluations of f in the forward pass, the tracked one included
    forward_residual: Tensor  # per sample: ||h_N - h_{N-1}|| / ||h_N||
    adjoint_solver: str | None = None
    adjoint_iterations: int | None = None  # J^T v products of the last backward
    adjoint_residual: float | None = None  # relative residual estimate of the last backward
    adjoint_stop: str | None = None  # "tol", "max_steps", "diverged" or "published"
    backward_calls: int = 0

    @property
    def max_forward_residual(self) -> float:
        return float(self.forward_residual.max()) if self.forward_residual.numel() else 0.0

    def as_dict(self) -> dict:
        """Plain Python values, for logs and JSON."""
        return {
            "algorithm": self.algorithm, "solver": self.solver, "steps": self.steps,
            "forward_residual": self.forward_residual.tolist(),
            "max_forward_residual": self.max_forward_residual,
            "adjoint_solver": self.adjoint_solver, "adjoint_iterations": self.adjoint_iterations,
            "adjoint_residual": self.adjoint_residual, "adjoint_stop": self.adjoint_stop,
            "backward_calls": self.backward_calls,
        }


@dataclass
class FixedPointResult:
    """``state``: h_N (differentiable as the algorithm says); ``penalty``: LCP or None; ``stats``."""

    state: Tensor
    penalty: Tensor | None
    stats: FixedPointStats = field(repr=False)


@dataclass
class _AdjointConfig:
    vjp_factory: Callable[[], Callable[[Tensor], Tensor]]
    solver: str
    steps: int
    tol: float
    rule: str
    window: int
    damping: float
    stats: FixedPointStats
    scope: SpectraScope  # the call's kernel spectra, for the adjoint products; closed after it


class _ImplicitGradient(torch.autograd.Function):
    """Identity in the forward; in the backward, replaces dL/dh_N by the adjoint solution g."""

    @staticmethod
    def forward(ctx, h_last: Tensor, cfg: _AdjointConfig) -> Tensor:
        ctx.cfg = cfg
        return h_last.view_as(h_last)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        cfg: _AdjointConfig = ctx.cfg
        # A second backward (retain_graph) finds the call's scope closed: it gets a fresh one.
        scope = cfg.scope if not cfg.scope.closed else SpectraScope()
        try:
            with scope:
                vjp = cfg.vjp_factory()
                if cfg.solver == "neumann":
                    res = neumann_adjoint(vjp, grad, max_steps=cfg.steps, tol=cfg.tol, rule=cfg.rule)
                else:
                    res = anderson_adjoint(
                        vjp, grad, max_steps=cfg.steps, tol=cfg.tol, window=cfg.window, damping=cfg.damping,
                    )
        finally:
            scope.close()
        st = cfg.stats
        st.adjoint_iterations, st.adjoint_residual, st.adjoint_stop = res.iterations, res.residual, res.stop
        st.backward_calls += 1
        return res.solution, None


def _choice(arg: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{arg}: expected one of {choices}, got {value!r}")


def _nonneg_int(arg: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{arg}: expected an int >= {minimum}, got {value!r}")
    return value


def _nonneg_float(arg: str, value: object) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{arg}: expected a number, got {value!r}") from None
    if not out >= 0 or math.isinf(out):
        raise ValueError(f"{arg}: expected a finite number >= 0, got {value!r}")
    return out


def _checked_step(f: Callable, x: Tensor, h: Tensor) -> Tensor:
    """``f(x, h)``, refused unless it is a state like ``h``: same shape, dtype and device.

    The engine iterates h <- f(x, h) and differentiates through the last step, so a module that
    crops, pools or averages over the batch (a broadcastable but different shape), changes the
    dtype or moves the state would otherwise run, and train, on something that is not a fixed
    point of anything. The checks read metadata only (no host synchronisation).
    """
    out = f(x, h)
    if not isinstance(out, Tensor):
        raise TypeError(f"f: expected f(x, h) to return a torch.Tensor like h, got {type(out).__name__}")
    if out.shape != h.shape:
        raise ValueError(
            f"f: expected f(x, h) to return a state of h's shape {tuple(h.shape)}, got {tuple(out.shape)}; "
            f"a fixed-point step maps a state to a state of the same shape"
        )
    if out.dtype != h.dtype and not torch.is_autocast_enabled(h.device.type):
        raise TypeError(f"f: expected f(x, h) to return h's dtype {h.dtype}, got {out.dtype}")
    if out.device != h.device:
        raise ValueError(f"f: expected f(x, h) to return a state on h's device {h.device}, got {out.device}")
    return out


def _relative_residual(h_new: Tensor, h_old: Tensor) -> Tensor:
    dims = tuple(range(1, h_new.dim()))
    num = torch.linalg.vector_norm((h_new - h_old).float(), dim=dims)
    den = torch.linalg.vector_norm(h_new.float(), dim=dims).clamp_min(torch.finfo(torch.float32).tiny)
    return num / den


class _FiniteWatch:
    """Records the first forward step with a non-finite state, without a host sync per step."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled = enabled
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device) if enabled else None

    def update(self, h: Tensor, t: int) -> None:
        if self.enabled:
            if h.dtype in (torch.float16, torch.bfloat16, torch.float32):
                # One pass instead of isfinite's several: a float64 sum of such values cannot
                # overflow, so it is finite exactly when every value is.
                bad = ~torch.isfinite(h.sum(dtype=torch.float64))
            else:
                bad = ~torch.isfinite(h).all()
            self.first_bad = torch.where((self.first_bad < 0) & bad, torch.full_like(self.first_bad, t), self.first_bad)

    def check(self, steps: int) -> None:
        if self.enabled and int(self.first_bad) >= 0:
            raise FloatingPointError(
                f"fixed_point: the state became non-finite (NaN or inf) at forward step "
                f"{int(self.first_bad)} of {steps}; lower the learning rate, add the LCP "
                f"penalty (algorithm='crbp'), or check the input for NaN"
            )


def fixed_point(
    f: nn.Module, x: Tensor, h0: Tensor | None = None, *, steps: int = 20, algorithm: str = "crbp",
    solver: str = "iteration", tol: float = 0.0, anderson_window: int = 5, anderson_damping: float = 1.0,
    adjoint_steps: int = 15, adjoint_tol: float = 1e-5, adjoint_solver: str = "neumann",
    adjoint_rule: str = "relative", lcp_target: float = 0.9, use_linearize: bool | None = None,
    check_finite: bool = True,
) -> FixedPointResult:
    """Run ``h <- f(x, h)`` towards its fixed point and make the result trainable.

    Args:
        f: any module (or callable) with ``f(x, h) -> h``; every call must return a tensor of
            h's shape, dtype and device (else ``ValueError`` / ``TypeError`` naming ``f``).
            If it has ``linearize(x, h)``
            (returning an object with ``.state`` and ``.vjp(v)``) the adjoint uses it.
        x: the drive, passed unchanged to every step. Gradients flow to whatever produced it.
        h0: the initial state; zeros of the shape of ``x`` when None.
        steps: N, the number of steps (evaluations of f) in the forward pass.
        algorithm: ``"bptt"``, ``"cbptt"``, ``"rbp"`` or ``"crbp"`` (module docstring's table).
        solver: ``"iteration"`` (plain h <- f(x, h), as published) or ``"anderson"``
            (Anderson acceleration; rbp/crbp, or without gradients).
        tol: stop the forward solve early once every sample's relative residual is below it
            (0: always run N steps).
        anderson_window, anderson_damping: Anderson's history length and mixing weight.
        adjoint_steps: the most J^T v products per backward.
        adjoint_tol: relative tolerance of the adjoint (0: run exactly ``adjoint_steps``).
        adjoint_solver: ``"neumann"`` (the series sum_k (J^T)^k v, as published) or ``"anderson"``.
        adjoint_rule: ``"relative"`` (tolerance plus a divergence guard) or
            ``"published"`` (stop when ||g|| > 1, ||v|| grows or ||v|| < 1e-9). Under either
            rule and either solver, a diverged adjoint (a non-finite term, a term past 1e4 x
            the first, or a last term larger than the first) warns with
            :class:`AdjointDivergenceWarning`, sets ``stats.adjoint_stop = "diverged"`` and
            returns the best partial Neumann sum (where ||(J^T)^k v|| was smallest), never the
            diverging sum: the gradient stays finite and bounded.
        lcp_target: lambda of the LCP penalty of cbptt/crbp (a finite number >= 0).
        use_linearize: use ``f.linearize`` for the adjoint (None: when f has it).
        check_finite: raise ``FloatingPointError`` naming the step if the state turns NaN/inf.

    Returns:
        :class:`FixedPointResult` with ``state`` (h_N), ``penalty`` (a differentiable scalar
        for cbptt/crbp while training with gradients enabled, else None) and ``stats``
        (:class:`FixedPointStats`; its adjoint fields are filled in when backward runs).

    Without gradients (``torch.no_grad()``) every algorithm runs N plain steps and keeps no
    graph; in eval mode (``f.training`` False) no penalty is computed.

    Example:
        >>> res = fixed_point(cell, x, steps=20, algorithm="crbp")
        >>> loss = criterion(res.state) + 10 * res.penalty
        >>> loss.backward()
    """
    if not callable(f):
        raise TypeError(f"f: expected a module f(x, h) -> h, got {type(f).__name__}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating dtype, got {x.dtype}")
    _nonneg_int("steps", steps, 1)
    _choice("algorithm", algorithm, ALGORITHMS)
    _choice("solver", solver, SOLVERS)
    _choice("adjoint_solver", adjoint_solver, ADJOINT_SOLVERS)
    _choice("adjoint_rule", adjoint_rule, ADJOINT_RULES)
    _nonneg_int("adjoint_steps", adjoint_steps, 0)
    _nonneg_int("anderson_window", anderson_window, 1)
    adjoint_tol = _nonneg_float("adjoint_tol", adjoint_tol)
    tol = _nonneg_float("tol", tol)
    damping = _nonneg_float("anderson_damping", anderson_damping)
    if not 0 < damping <= 1:
        raise ValueError(f"anderson_damping: expected a number in (0, 1], got {anderson_damping!r}")
    lcp_target = _nonneg_float("lcp_target", lcp_target)
    if h0 is None:
        h0 = torch.zeros_like(x)
    elif not isinstance(h0, Tensor):
        raise TypeError(f"h0: expected a torch.Tensor or None, got {type(h0).__name__}")
    if hasattr(f, "check_inputs"):
        h0 = f.check_inputs(x, h0)
    elif h0.device != x.device:
        raise ValueError(f"h0: expected the device of x ({x.device}), got {h0.device}")

    # The kernel spectra of f's FFT convs live for this call (and its adjoint): computed once,
    # used by every step, the penalty and each adjoint product (crbp_fast.conv.fft).
    scope = SpectraScope()
    try:
        with scope:
            result = _solve(
                f, x, h0, scope, steps=steps, algorithm=algorithm, solver=solver, tol=tol,
                anderson_window=anderson_window, damping=damping, adjoint_steps=adjoint_steps,
                adjoint_tol=adjoint_tol, adjoint_solver=adjoint_solver, adjoint_rule=adjoint_rule,
                lcp_target=lcp_target, use_linearize=use_linearize, check_finite=check_finite,
            )
    except BaseException:
        scope.close()
        raise
    if not (result.state.requires_grad and algorithm in ("rbp", "crbp")):
        scope.close()  # no adjoint to come
    return result


def _solve(
    f, x: Tensor, h0: Tensor, scope: SpectraScope, *, steps: int, algorithm: str, solver: str, tol: float,
    anderson_window: int, damping: float, adjoint_steps: int, adjoint_tol: float, adjoint_solver: str,
    adjoint_rule: str, lcp_target: float, use_linearize: bool | None, check_finite: bool,
) -> FixedPointResult:
    grad = torch.is_grad_enabled()
    training = bool(getattr(f, "training", True))
    implicit = algorithm in ("rbp", "crbp")
    if solver == "anderson" and grad and not implicit:
        raise ValueError(
            f"solver: 'anderson' keeps no graph, so it needs algorithm 'rbp' or 'crbp' when "
            f"gradients are enabled, got algorithm={algorithm!r}"
        )
    watch = _FiniteWatch(check_finite, x.device)
    stats = FixedPointStats(algorithm=algorithm, solver=solver, steps=0, forward_residual=x.new_zeros(0))

    def solve_untracked(h: Tensor, n: int, start: int) -> tuple[Tensor, Tensor, int]:
        """n steps without graph from h; returns (h_n, h_{n-1}, evaluations)."""
        prev = h
        if n == 0:
            return h, h, 0
        if solver == "iteration":
            for t in range(n):
                prev, h = h, _checked_step(f, x, h)
                watch.update(h, start + t + 1)
                if tol > 0 and t + 1 < n and bool((_relative_residual(h, prev) < tol).all()):
                    return h, prev, t + 1
            return h, prev, n
        shape = h.shape
        count = [0]

        def anderson_step(z: Tensor) -> Tensor:
            # Watched at every evaluation, so a non-finite state is reported at the step where
            # it first appeared, not at the last one.
            out = _checked_step(f, x, z.reshape(shape))
            count[0] += 1
            watch.update(out, start + count[0])
            return out.reshape(shape[0], -1)

        x_last, fx_last, evals = anderson(
            anderson_step, h.reshape(shape[0], -1), max_steps=n, tol=tol, window=anderson_window, damping=damping,
        )
        return fx_last.reshape(shape), x_last.reshape(shape), evals

    if not grad:
        with torch.no_grad():
            h, prev, evals = solve_untracked(h0, steps, 0)
        watch.check(steps)
        stats.steps, stats.forward_residual = evals, _relative_residual(h, prev)
        return FixedPointResult(h, None, stats)

    with_penalty = algorithm in ("cbptt", "crbp") and training
    if not implicit:
        h = h0
        for t in range(steps):
            if with_penalty and t == steps - 1 and not h.requires_grad:
                # The LCP differentiates the last step w.r.t. its input: make a constant
                # input (h0 when N = 1, or a state that does not depend on anything tracked) a leaf.
                h = h.detach().requires_grad_(True)
            prev, h = h, _checked_step(f, x, h)
            watch.update(h.detach(), t + 1)
        watch.check(steps)
        penalty = lcp_from_step(h, prev, lcp_target, create_graph=True) if with_penalty else None
        with torch.no_grad():
            stats.steps, stats.forward_residual = steps, _relative_residual(h, prev)
        return FixedPointResult(h, penalty, stats)

    # rbp / crbp: N-1 steps without graph, one tracked step from the detached h_{N-1}.
    with torch.no_grad():
        h_prev, _, evals = solve_untracked(h0, steps - 1, 0)
    h_prev = h_prev.detach().requires_grad_(True)
    h_last = _checked_step(f, x, h_prev)
    watch.update(h_last.detach(), evals + 1)
    watch.check(steps)
    with torch.no_grad():
        stats.steps, stats.forward_residual = evals + 1, _relative_residual(h_last, h_prev)
    stats.adjoint_solver = adjoint_solver
    penalty = lcp_from_step(h_last, h_prev, lcp_target, create_graph=True) if with_penalty else None

    if use_linearize is None:
        use_linearize = hasattr(f, "linearize")
    if use_linearize:
        x_point, h_point = x.detach(), h_prev.detach()

        def vjp_factory() -> Callable[[Tensor], Tensor]:
            lin_vjp = f.linearize(x_point, h_point).vjp

            def vjp(v: Tensor) -> Tensor:
                u = lin_vjp(v)
                if not isinstance(u, Tensor) or u.shape != v.shape:
                    raise ValueError(
                        f"f.linearize: expected .vjp(v) to return a tensor of v's shape {tuple(v.shape)}, "
                        f"got {tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__}"
                    )
                return u
            return vjp
    else:
        def vjp_factory() -> Callable[[Tensor], Tensor]:
            def vjp(v: Tensor) -> Tensor:
                (u,) = torch.autograd.grad(h_last, h_prev, v, retain_graph=True)
                return u
            return vjp

    cfg = _AdjointConfig(
        vjp_factory=vjp_factory, solver=adjoint_solver, steps=adjoint_steps, tol=adjoint_tol,
        rule=adjoint_rule, window=anderson_window, damping=damping, stats=stats, scope=scope,
    )
    state = _ImplicitGradient.apply(h_last, cfg) if h_last.requires_grad else h_last
    return FixedPointResult(state, penalty, stats)
