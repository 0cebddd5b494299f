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
from typing import Any, Callable

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils import _pytree as pytree

from ..conv.fft import SpectraScope
from .lcp import lcp_from_step
from .solvers import anderson, anderson_adjoint, neumann_adjoint
from .state import StateSpec, check_output, flat, relative_residual, state_spec, unflat

ALGORITHMS = ("bptt", "cbptt", "rbp", "crbp")
#: Every ``algorithm`` of :func:`fixed_point`: the paper's four (:data:`ALGORITHMS`, what the
#: trainers and the bench sweep) and ``"phantom"`` (a k-step damped unrolled gradient).
ENGINE_ALGORITHMS = ALGORITHMS + ("phantom",)
SOLVERS = ("iteration", "anderson")
ADJOINT_SOLVERS = ("neumann", "anderson")
ADJOINT_RULES = ("relative", "published")


@dataclass
class FixedPointTrace:
    """Per-iteration relative residuals of one call: the forward solve's and the last adjoint's.

    Recorded as device tensors, one small reduction per iteration and no host synchronisation
    (stacked when the solve ends), so tracing does not stall a GPU pipeline.

    - ``forward``: (T, B) tensor: at forward evaluation t (1..T; the tracked steps included),
      ||F(x, z) - z|| / ||F(x, z)|| per sample over every state tensor, z the state evaluated
      (for the plain iteration: ||h_t - h_{t-1}|| / ||h_t||).
    - ``adjoint``: (K,) tensor of the last backward's adjoint iterations: ||v_k|| / ||g_k|| for
      the Neumann series (the size of the term just added against the sum), ||G(g) - g|| / ||G(g)||
      for Anderson (G(g) = dL/dh + J^T g); None until a backward of rbp / crbp runs.
    """

    forward: Tensor
    adjoint: Tensor | None = None

    @property
    def forward_max(self) -> Tensor:
        """(T,): the largest per-sample forward residual at each evaluation."""
        return self.forward.amax(dim=1) if self.forward.numel() else self.forward.new_zeros(self.forward.shape[0])

    @property
    def lowest_forward(self) -> float:
        """The lowest forward residual over the iterations (of the worst sample at each)."""
        return float(self.forward_max.min()) if self.forward.numel() else math.nan

    @property
    def lowest_forward_step(self) -> int:
        """The evaluation (1-based) where :attr:`lowest_forward` was reached."""
        return int(self.forward_max.argmin()) + 1 if self.forward.numel() else 0

    @property
    def lowest_adjoint(self) -> float | None:
        """The lowest adjoint residual over the iterations (None without an adjoint trace)."""
        if self.adjoint is None or not self.adjoint.numel():
            return None
        return float(self.adjoint.min())

    def as_dict(self) -> dict:
        return {
            "forward": self.forward.tolist(), "forward_max": self.forward_max.tolist(),
            "lowest_forward": self.lowest_forward, "lowest_forward_step": self.lowest_forward_step,
            "adjoint": None if self.adjoint is None else self.adjoint.tolist(), "lowest_adjoint": self.lowest_adjoint,
        }


@dataclass
class FixedPointStats:
    """What the forward solve did, and (filled in when backward runs) what the adjoint did."""

    algorithm: str
    solver: str
    steps: int  # evaluations of f in the forward pass, the tracked one(s) included
    forward_residual: Tensor  # per sample: ||h_N - h_{N-1}|| / ||h_N|| (over every state tensor)
    adjoint_solver: str | None = None
    adjoint_iterations: int | None = None  # J^T v products of the last backward
    adjoint_residual: float | None = None  # relative residual estimate of the last backward
    adjoint_stop: str | None = None  # "tol", "max_steps", "diverged" or "published"
    backward_calls: int = 0
    trace: FixedPointTrace | None = None  # per-iteration residuals, with fixed_point(trace=True)

    @property
    def max_forward_residual(self) -> float:
        return float(self.forward_residual.max()) if self.forward_residual.numel() else 0.0

    def as_dict(self) -> dict:
        """Plain Python values, for logs and JSON."""
        out = {
            "algorithm": self.algorithm, "solver": self.solver, "steps": self.steps,
            "forward_residual": self.forward_residual.tolist(),
            "max_forward_residual": self.max_forward_residual,
            "adjoint_solver": self.adjoint_solver, "adjoint_iterations": self.adjoint_iterations,
            "adjoint_residual": self.adjoint_residual, "adjoint_stop": self.adjoint_stop,
            "backward_calls": self.backward_calls,
        }
        if self.trace is not None:
            out["trace"] = self.trace.as_dict()
        return out


@dataclass
class FixedPointResult:
    """``state``: h_N (differentiable as the algorithm says; the structure of h0); ``penalty``:
    LCP or None; ``stats``."""

    state: Any
    penalty: Tensor | None
    stats: FixedPointStats = field(repr=False)


@dataclass
class _AdjointConfig:
    vjp_factory: Callable[[], Callable[[Tensor], Tensor]]  # J^T on the flattened state
    shapes: tuple[torch.Size, ...]  # of the state's tensors, to flatten the incoming gradients
    solver: str
    steps: int
    tol: float
    rule: str
    window: int
    damping: float
    stats: FixedPointStats
    scope: SpectraScope  # the call's kernel spectra, for the adjoint products; closed after it
    trace: bool


class _ImplicitGradient(torch.autograd.Function):
    """Identity in the forward; in the backward, replaces dL/dh_N by the adjoint solution g.

    Takes and returns the state's tensors (one or several); the adjoint runs on them flattened.
    """

    @staticmethod
    def forward(ctx, cfg: _AdjointConfig, *h_last: Tensor):
        ctx.cfg = cfg
        return tuple(h.view_as(h) for h in h_last)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: Tensor):
        cfg: _AdjointConfig = ctx.cfg
        grad = flat(grads)
        trace: list[Tensor] | None = [] if cfg.trace else None
        # A second backward (retain_graph) finds the call's scope closed: it gets a fresh one.
        scope = cfg.scope if not cfg.scope.closed else SpectraScope()
        try:
            with scope:
                vjp = cfg.vjp_factory()
                if cfg.solver == "neumann":
                    res = neumann_adjoint(vjp, grad, max_steps=cfg.steps, tol=cfg.tol, rule=cfg.rule, trace=trace)
                else:
                    res = anderson_adjoint(
                        vjp, grad, max_steps=cfg.steps, tol=cfg.tol, window=cfg.window, damping=cfg.damping,
                        trace=trace,
                    )
        finally:
            scope.close()
        st = cfg.stats
        st.adjoint_iterations, st.adjoint_residual, st.adjoint_stop = res.iterations, res.residual, res.stop
        st.backward_calls += 1
        if trace is not None and st.trace is not None:
            st.trace.adjoint = torch.stack(trace) if trace else grad.new_zeros(0, dtype=torch.float32)
        return (None, *unflat(res.solution, cfg.shapes))


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


class _Step:
    """``f`` as the engine calls it: on a state's tensors (its leaves), with its result checked.

    ``f(x, h)`` is refused unless it is a state like ``h``: the same structure, and every tensor
    of the same shape, dtype and device. The engine iterates h <- f(x, h) and differentiates
    through the last step, so a module that crops, pools or averages over the batch (a
    broadcastable but different shape), changes the dtype or moves the state would otherwise run,
    and train, on something that is not a fixed point of anything. The checks read metadata only
    (no host synchronisation).
    """

    def __init__(self, f: Callable, x, spec: StateSpec):
        self.f, self.x, self.spec = f, x, spec

    def __call__(self, leaves: list[Tensor]) -> list[Tensor]:
        return check_output(self.f(self.x, self.spec.unflatten(leaves)), self.spec)


class _FiniteWatch:
    """Records the first forward step with a non-finite state, without a host sync per step."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled = enabled
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device) if enabled else None

    def update(self, leaves: list[Tensor], t: int) -> None:
        if self.enabled:
            bad = None
            for h in leaves:
                if h.dtype in (torch.float16, torch.bfloat16, torch.float32):
                    # One pass instead of isfinite's several: a float64 sum of such values cannot
                    # overflow, so it is finite exactly when every value is.
                    b = ~torch.isfinite(h.sum(dtype=torch.float64))
                else:
                    b = ~torch.isfinite(h).all()
                bad = b if bad is None else bad | b
            self.first_bad = torch.where((self.first_bad < 0) & bad, torch.full_like(self.first_bad, t), self.first_bad)

    def check(self, steps: int) -> None:
        if self.enabled and int(self.first_bad) >= 0:
            raise FloatingPointError(
                f"fixed_point: the state became non-finite (NaN or inf) at forward step "
                f"{int(self.first_bad)} of {steps}; lower the learning rate, add the LCP "
                f"penalty (algorithm='crbp'), or check the input for NaN"
            )


def _check_drive(x) -> None:
    if isinstance(x, Tensor):
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating dtype, got {x.dtype}")
        return
    leaves, tree = pytree.tree_flatten(x)
    if tree.is_leaf() or not leaves or not all(isinstance(v, Tensor) for v in leaves):
        raise TypeError(
            f"x: expected a torch.Tensor (or a nested tuple / list / dict of tensors), got {type(x).__name__}")
    for v in leaves:
        if not v.is_floating_point():
            raise TypeError(f"x: expected floating tensors, got {v.dtype}")


def _initial_state(f, x, h0):
    """h0 as given; else ``f.init_state(x)`` when the cell has one; else zeros of x's shape."""
    if h0 is not None:
        return h0
    if hasattr(f, "init_state"):
        return f.init_state(x)
    if not isinstance(x, Tensor):
        raise TypeError(
            f"h0: expected an initial state when x is a structure ({type(x).__name__}) and f has no init_state(x), "
            f"got None")
    return torch.zeros_like(x)


def _detach_drive(x):
    return x.detach() if isinstance(x, Tensor) else pytree.tree_map(lambda v: v.detach(), x)


def fixed_point(
    f: nn.Module, x: Tensor, h0: Any = None, *, steps: int = 20, algorithm: str = "crbp",
    solver: str = "iteration", tol: float = 0.0, anderson_window: int = 5, anderson_damping: float = 1.0,
    adjoint_steps: int = 15, adjoint_tol: float = 1e-5, adjoint_solver: str = "neumann",
    adjoint_rule: str = "relative", lcp_target: float = 0.9, use_linearize: bool | None = None,
    check_finite: bool = True, trace: bool = False, phantom_steps: int = 5, phantom_damping: float = 0.5,
) -> FixedPointResult:
    """Run ``h <- f(x, h)`` towards its fixed point and make the result trainable.

    Args:
        f: any module (or callable) with ``f(x, h) -> h``; every call must return a state like
            h: the same structure, each tensor of h's shape, dtype and device (else
            ``ValueError`` / ``TypeError`` naming ``f``). If it has ``linearize(x, h)``
            (returning an object with ``.state`` and ``.vjp(v)``, v and the result structured as
            h) the adjoint uses it; if it has ``init_state(x)``, that is the default h0.
        x: the drive, passed unchanged to every step (a tensor, or a structure of tensors).
            Gradients flow to whatever produced it.
        h0: the initial state: a tensor, or any nested tuple / list / dict of tensors sharing
            the batch size, dtype and device (a ConvLSTM's ``(h, c)``, one state per FPN level);
            when None, ``f.init_state(x)`` if f has it, else zeros of the shape of ``x``. Every
            algorithm, solver, the LCP and the stats work on all of its tensors together (norms
            over all of them; Anderson and the adjoint on the state flattened).
        steps: N, the number of steps (evaluations of f) in the forward pass.
        algorithm: ``"bptt"``, ``"cbptt"``, ``"rbp"``, ``"crbp"`` (module docstring's table) or
            ``"phantom"``: N - k evaluations without graph (the solver), then k tracked damped
            steps h <- (1 - lambda) h + lambda f(x, h) from the detached state (k =
            ``phantom_steps``, lambda = ``phantom_damping``), differentiated by autograd: a
            k-step unrolled ("phantom") gradient. Memory O(k), constant in N; with lambda = 1 at
            a fixed point its gradient is the Neumann series truncated after k terms, tending to
            the implicit gradient as k grows. No penalty (add :func:`lcp_penalty` if wanted).
        solver: ``"iteration"`` (plain h <- f(x, h), as published) or ``"anderson"``
            (Anderson acceleration; rbp/crbp/phantom, or without gradients).
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
        use_linearize: use ``f.linearize`` for the adjoint and, for a single-tensor state,
            ``f.tracked_step(x, h, lcp_target or None)`` for the tracked step of rbp / crbp
            (one node for the step and the LCP penalty, with an explicit backward, as
            :class:`~crbp_fast.HGRUCell` has), and then ``f.linearization_of(state)`` where f
            has it and it returns one (the tracked step's own factors, so the adjoint runs no
            second step); None: when f has them. False: autograd for all of it, the penalty by
            double backward (the published algorithm).
        check_finite: raise ``FloatingPointError`` naming the step if the state turns NaN/inf.
        trace: record ``stats.trace`` (:class:`FixedPointTrace`): the relative residual of every
            forward evaluation per sample, and of every adjoint iteration of the last backward,
            as device tensors without a host synchronisation per step (one small reduction per
            step; off by default).
        phantom_steps: k of ``algorithm="phantom"``, 1 <= k <= N.
        phantom_damping: lambda of ``algorithm="phantom"``, in (0, 1].

    Returns:
        :class:`FixedPointResult` with ``state`` (h_N, in h0's structure), ``penalty`` (a
        differentiable scalar for cbptt/crbp while training with gradients enabled, else None)
        and ``stats`` (:class:`FixedPointStats`; its adjoint fields are filled in when backward
        runs).

    Without gradients (``torch.no_grad()``) every algorithm runs N plain steps and keeps no
    graph; in eval mode (``f.training`` False) no penalty is computed.

    Example:
        >>> res = fixed_point(cell, x, steps=20, algorithm="crbp")
        >>> loss = criterion(res.state) + 10 * res.penalty
        >>> loss.backward()
    """
    if not callable(f):
        raise TypeError(f"f: expected a module f(x, h) -> h, got {type(f).__name__}")
    _check_drive(x)
    _nonneg_int("steps", steps, 1)
    _choice("algorithm", algorithm, ENGINE_ALGORITHMS)
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
    if not isinstance(trace, bool):
        raise TypeError(f"trace: expected a bool, got {trace!r}")
    if algorithm == "phantom":
        if isinstance(phantom_steps, bool) or not isinstance(phantom_steps, int) or not 1 <= phantom_steps <= steps:
            raise ValueError(f"phantom_steps: expected an int in 1..steps={steps}, got {phantom_steps!r}")
    lam = _nonneg_float("phantom_damping", phantom_damping)
    if not 0 < lam <= 1:
        raise ValueError(f"phantom_damping: expected a number in (0, 1], got {phantom_damping!r}")
    h0 = _initial_state(f, x, h0)
    if isinstance(h0, Tensor):
        if hasattr(f, "check_inputs"):
            h0 = f.check_inputs(x, h0)
        elif isinstance(x, Tensor) and h0.device != x.device:
            raise ValueError(f"h0: expected the device of x ({x.device}), got {h0.device}")
    leaves, spec = state_spec(
        "h0", h0, "a torch.Tensor or None, or a (nested) tuple / list / dict of floating tensors with one batch "
                  "size, dtype and device")
    if isinstance(x, Tensor) and spec.device != x.device:
        raise ValueError(f"h0: expected the device of x ({x.device}), got {spec.device}")

    # The kernel spectra of f's FFT convs live for this call (and its adjoint): computed once,
    # used by every step, the penalty and each adjoint product (crbp_fast.conv.fft).
    scope = SpectraScope()
    try:
        with scope:
            result, adjoint_to_come = _solve(
                f, x, leaves, spec, steps=steps, algorithm=algorithm, solver=solver, tol=tol,
                anderson_window=anderson_window, damping=damping, adjoint_steps=adjoint_steps,
                adjoint_tol=adjoint_tol, adjoint_solver=adjoint_solver, adjoint_rule=adjoint_rule,
                lcp_target=lcp_target, use_linearize=use_linearize, check_finite=check_finite, scope=scope,
                trace=trace, phantom_steps=phantom_steps, phantom_damping=lam,
            )
    except BaseException:
        scope.close()
        raise
    if not adjoint_to_come:
        scope.close()  # no adjoint to come
    return result


def _solve(
    f, x, h0: list[Tensor], spec: StateSpec, *, steps: int, algorithm: str, solver: str, tol: float,
    anderson_window: int, damping: float, adjoint_steps: int, adjoint_tol: float, adjoint_solver: str,
    adjoint_rule: str, lcp_target: float, use_linearize: bool | None, check_finite: bool, scope: SpectraScope,
    trace: bool, phantom_steps: int, phantom_damping: float,
) -> tuple[FixedPointResult, bool]:
    grad = torch.is_grad_enabled()
    training = bool(getattr(f, "training", True))
    implicit = algorithm in ("rbp", "crbp")
    if solver == "anderson" and grad and algorithm in ("bptt", "cbptt"):
        raise ValueError(
            f"solver: 'anderson' keeps no graph, so it needs algorithm 'rbp', 'crbp' or 'phantom' when "
            f"gradients are enabled, got algorithm={algorithm!r}"
        )
    step = _Step(f, x, spec)
    watch = _FiniteWatch(check_finite, spec.device)
    stats = FixedPointStats(algorithm=algorithm, solver=solver, steps=0, forward_residual=h0[0].new_zeros(0))
    # Per-evaluation residuals (B,), device tensors; stacked once at the end (no host sync per step).
    forward_trace: list[Tensor] | None = [] if trace else None

    def record(new: list[Tensor], old: list[Tensor]) -> Tensor:
        res = relative_residual([v.detach() for v in new], [v.detach() for v in old])
        if forward_trace is not None:
            forward_trace.append(res)
        return res

    def finish_trace() -> None:
        if forward_trace is not None:
            fwd = torch.stack(forward_trace) if forward_trace else h0[0].new_zeros(0, spec.batch, dtype=torch.float32)
            stats.trace = FixedPointTrace(forward=fwd)

    def solve_untracked(h: list[Tensor], n: int, start: int) -> tuple[list[Tensor], list[Tensor], int]:
        """n steps without graph from h; returns (h_n, h_{n-1}, evaluations)."""
        prev = h
        if n == 0:
            return h, h, 0
        if solver == "iteration":
            for t in range(n):
                prev, h = h, step(h)
                watch.update(h, start + t + 1)
                if tol > 0 or forward_trace is not None:
                    res = record(h, prev)
                    if tol > 0 and t + 1 < n and bool((res < tol).all()):
                        return h, prev, t + 1
            return h, prev, n
        batch, shapes = spec.batch, spec.shapes
        count = [0]

        def anderson_step(z: Tensor) -> Tensor:
            # Watched at every evaluation, so a non-finite state is reported at the step where
            # it first appeared, not at the last one.
            out = step(unflat(z, shapes, batch))
            count[0] += 1
            watch.update(out, start + count[0])
            return flat(out, batch)

        rows: list[Tensor] | None = [] if forward_trace is not None else None
        x_last, fx_last, evals = anderson(
            anderson_step, flat(h, batch), max_steps=n, tol=tol, window=anderson_window, damping=damping, trace=rows,
        )
        if forward_trace is not None:
            forward_trace.extend(r.float() for r in rows)
        return unflat(fx_last, shapes, batch), unflat(x_last, shapes, batch), evals

    if not grad:
        with torch.no_grad():
            h, prev, evals = solve_untracked(h0, steps, 0)
        watch.check(steps)
        stats.steps, stats.forward_residual = evals, relative_residual(h, prev)
        finish_trace()
        return FixedPointResult(spec.unflatten(h), None, stats), False

    with_penalty = algorithm in ("cbptt", "crbp") and training
    if algorithm in ("bptt", "cbptt"):
        h = h0
        for t in range(steps):
            if with_penalty and t == steps - 1:
                # The LCP differentiates the last step w.r.t. its input: make a constant
                # input (h0 when N = 1, or a state that does not depend on anything tracked) a leaf.
                h = [v if v.requires_grad else v.detach().requires_grad_(True) for v in h]
            prev, h = h, step(h)
            watch.update([v.detach() for v in h], t + 1)
            if forward_trace is not None:
                with torch.no_grad():
                    record(h, prev)
        watch.check(steps)
        penalty = lcp_from_step(h, prev, lcp_target, create_graph=True) if with_penalty else None
        with torch.no_grad():
            stats.steps, stats.forward_residual = steps, relative_residual(h, prev)
        finish_trace()
        return FixedPointResult(spec.unflatten(h), penalty, stats), False

    if algorithm == "phantom":
        # N - k evaluations without graph, then k tracked damped steps from the detached state:
        # autograd keeps the k steps' activations (O(k)) and differentiates through them.
        k, lam = phantom_steps, phantom_damping
        with torch.no_grad():
            z, _, evals = solve_untracked(h0, steps - k, 0)
        z = [v.detach() for v in z]
        for j in range(k):
            fz = step(z)
            watch.update([v.detach() for v in fz], evals + j + 1)
            with torch.no_grad():
                res = record(fz, z)
            z = fz if lam == 1.0 else [(1 - lam) * a + lam * b for a, b in zip(z, fz)]
        watch.check(steps)
        stats.steps, stats.forward_residual = evals + k, res
        finish_trace()
        return FixedPointResult(spec.unflatten(z), None, stats), False

    # rbp / crbp: N-1 steps without graph, one tracked step from the detached h_{N-1}.
    with torch.no_grad():
        h_prev, _, evals = solve_untracked(h0, steps - 1, 0)
    h_prev = [v.detach().requires_grad_(True) for v in h_prev]
    if use_linearize is None:
        use_linearize = hasattr(f, "linearize")
    # A cell with an explicit tracked step (HGRUCell) differentiates the step and the penalty in
    # one pass; otherwise autograd through the recorded step, the penalty by double backward.
    fused = use_linearize and spec.single and hasattr(f, "tracked_step")
    penalty = None
    if fused:
        out = f.tracked_step(x, h_prev[0], lcp_target if with_penalty else None)
        if with_penalty:
            out, penalty = out
        h_last = check_output(out, spec)
    else:
        h_last = step(h_prev)
    watch.update([v.detach() for v in h_last], evals + 1)
    watch.check(steps)
    with torch.no_grad():
        stats.steps, stats.forward_residual = evals + 1, record(h_last, h_prev)
    finish_trace()
    stats.adjoint_solver = adjoint_solver
    if with_penalty and not fused:
        penalty = lcp_from_step(h_last, h_prev, lcp_target, create_graph=True)

    shapes = spec.shapes
    if use_linearize:
        x_point, h_point = _detach_drive(x), spec.unflatten([v.detach() for v in h_prev])

        def vjp_factory() -> Callable[[Tensor], Tensor]:
            # A cell whose tracked step already holds the factors at this point hands them over
            # (HGRUCell.linearization_of): the adjoint then needs no second step.
            lin = f.linearization_of(h_last[0]) if fused and hasattr(f, "linearization_of") else None
            lin_vjp = (lin if lin is not None else f.linearize(x_point, h_point)).vjp

            def vjp(v: Tensor) -> Tensor:
                if spec.single:
                    u = lin_vjp(v)
                    if not isinstance(u, Tensor) or u.shape != v.shape:
                        raise ValueError(
                            f"f.linearize: expected .vjp(v) to return a tensor of v's shape {tuple(v.shape)}, "
                            f"got {tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__}"
                        )
                    return u
                u = lin_vjp(spec.unflatten(unflat(v, shapes)))
                got, tree = pytree.tree_flatten(u)
                if tree != spec.tree or [tuple(g.shape) if isinstance(g, Tensor) else None for g in got] != [
                        tuple(s) for s in shapes]:
                    raise ValueError(
                        f"f.linearize: expected .vjp(v) to return a state like v, {spec.describe()}, got {type(u).__name__}")
                return flat(got)
            return vjp
    else:
        tracked = [i for i, v in enumerate(h_last) if v.requires_grad]

        def vjp_factory() -> Callable[[Tensor], Tensor]:
            def vjp(v: Tensor) -> Tensor:
                vs = unflat(v, shapes)
                us = torch.autograd.grad(
                    [h_last[i] for i in tracked], h_prev, [vs[i] for i in tracked], retain_graph=True,
                    allow_unused=len(h_prev) > 1,
                )
                return flat([u if u is not None else torch.zeros_like(p) for u, p in zip(us, h_prev)])
            return vjp

    if not any(v.requires_grad for v in h_last):
        return FixedPointResult(spec.unflatten(h_last), penalty, stats), False
    cfg = _AdjointConfig(
        vjp_factory=vjp_factory, shapes=shapes, solver=adjoint_solver, steps=adjoint_steps, tol=adjoint_tol,
        rule=adjoint_rule, window=anderson_window, damping=damping, stats=stats, scope=scope, trace=trace,
    )
    state = list(_ImplicitGradient.apply(cfg, *h_last))
    return FixedPointResult(spec.unflatten(state), penalty, stats), True
