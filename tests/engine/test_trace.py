"""stats.trace: the per-iteration relative residuals of the forward solve and of the adjoint equal
residuals computed independently, are recorded without a host synchronisation per step, and plot."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from crbp_fast import FixedPointTrace, fixed_point
from crbp_fast.engine.trace import plot_trace

DT = torch.float64


class Pair(nn.Module):
    """A contractive two-tensor step on (B, D) states."""

    def __init__(self, d: int = 6, scale: float = 0.5):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w = nn.Parameter(scale * torch.randn(d, d, generator=g, dtype=DT) / d ** 0.5)
        self.u = nn.Parameter(scale * torch.randn(d, d, generator=g, dtype=DT) / d ** 0.5)

    def forward(self, x, state):
        a, b = state
        return torch.tanh(a @ self.w.T + b + x), 0.6 * b + 0.2 * torch.tanh(a @ self.u.T)


def rel(new, old):
    num = sum((n - o).pow(2).sum(1) for n, o in zip(new, old)).sqrt()
    den = sum(n.pow(2).sum(1) for n in new).sqrt()
    return num / den


@pytest.mark.parametrize("algorithm", ["bptt", "rbp", "crbp", "phantom"])
def test_forward_trace_equals_independent_residuals(algorithm):
    f = Pair()
    x = torch.randn(3, 6, dtype=DT, requires_grad=True)
    z = torch.zeros(3, 6, dtype=DT)
    n = 9
    res = fixed_point(f, x, (z, z), steps=n, algorithm=algorithm, trace=True, phantom_steps=3, phantom_damping=1.0)
    tr = res.stats.trace
    assert isinstance(tr, FixedPointTrace) and tr.forward.shape == (n, 3) and tr.adjoint is None
    with torch.no_grad():
        states, expected = [(z, z)], []
        for _ in range(n):
            states.append(f(x, states[-1]))
            expected.append(rel(states[-1], states[-2]))
    expected = torch.stack(expected).float()
    torch.testing.assert_close(tr.forward, expected, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(tr.forward[-1], res.stats.forward_residual.float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(tr.forward_max, expected.amax(1), rtol=1e-5, atol=1e-9)
    assert tr.lowest_forward == pytest.approx(float(expected.amax(1).min()), rel=1e-5)
    assert tr.lowest_forward_step == int(expected.amax(1).argmin()) + 1


@pytest.mark.parametrize("adjoint_tol", [0.0, 1e-3])
def test_neumann_adjoint_trace_equals_independent_series(adjoint_tol):
    f = Pair()
    x = torch.randn(2, 6, dtype=DT, requires_grad=True)
    z = torch.zeros(2, 6, dtype=DT)
    res = fixed_point(f, x, (z, z), steps=40, algorithm="rbp", adjoint_steps=25, adjoint_tol=adjoint_tol, trace=True)
    a, b = res.state
    loss = (a * torch.arange(12, dtype=DT).reshape(2, 6)).sum() + b.pow(2).sum()
    loss.backward()
    tr = res.stats.trace
    assert tr.adjoint is not None and len(tr.adjoint) == res.stats.adjoint_iterations
    # The series by hand: v_0 = dL/dh_N, v_k = J^T v_{k-1} at the tracked step's input, g_k = sum.
    h_in = [s.detach().requires_grad_(True) for s in fixed_point(f, x.detach(), (z, z), steps=39, algorithm="bptt").state]
    out = f(x.detach(), tuple(h_in))
    v = [torch.arange(12, dtype=DT).reshape(2, 6), 2 * b.detach()]  # dL/da, dL/db
    g = [t.clone() for t in v]
    expected = []
    for _ in range(res.stats.adjoint_iterations):
        v = list(torch.autograd.grad(out, h_in, v, retain_graph=True))
        g = [gi + vi for gi, vi in zip(g, v)]
        expected.append(torch.cat([t.reshape(-1) for t in v]).norm() / torch.cat([t.reshape(-1) for t in g]).norm())
    torch.testing.assert_close(tr.adjoint, torch.stack(expected), rtol=1e-10, atol=1e-14)
    assert tr.lowest_adjoint == pytest.approx(float(torch.stack(expected).min()), rel=1e-10)
    if adjoint_tol:
        assert res.stats.adjoint_stop == "tol" and float(tr.adjoint[-1]) < adjoint_tol <= float(tr.adjoint[-2])
    json.dumps(res.stats.as_dict())  # the trace is in the stats' JSON


def test_anderson_traces_forward_and_adjoint():
    f = Pair(scale=0.9)
    x = torch.randn(3, 6, dtype=DT, requires_grad=True)
    z = torch.zeros(3, 6, dtype=DT)
    res = fixed_point(f, x, (z, z), steps=80, algorithm="rbp", solver="anderson", tol=1e-8, adjoint_solver="anderson",
                      adjoint_steps=80, adjoint_tol=1e-8, trace=True)
    res.state[0].sum().backward()
    tr = res.stats.trace
    assert tr.forward.shape == (res.stats.steps, 3)
    assert res.stats.steps < 80 and float(tr.forward_max[-2]) < 1e-8 <= float(tr.forward_max[-3])  # stopped on tol
    torch.testing.assert_close(tr.forward[-1], res.stats.forward_residual.float(), rtol=1e-6, atol=1e-12)
    assert len(tr.adjoint) == res.stats.adjoint_iterations < 80 and float(tr.adjoint[-1]) < 1e-8
    assert res.stats.adjoint_stop == "tol"
    assert res.stats.adjoint_residual == pytest.approx(float(tr.adjoint[-1]), rel=1e-6)


SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


def count_syncs(monkeypatch, fn) -> int:
    """Host reads of tensor values (item / bool / float / int / tolist) while ``fn`` runs."""
    count = [0]
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def wrapped(self, *args, _original=original, **kwargs):
            count[0] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    try:
        fn()
    finally:
        monkeypatch.undo()
    return count[0]


@pytest.mark.parametrize("solver, adjoint_solver", [("iteration", "neumann"), ("anderson", "anderson")])
def test_trace_costs_no_host_sync_per_step(monkeypatch, solver, adjoint_solver):
    f = Pair()
    x = torch.randn(2, 6, dtype=DT, requires_grad=True)
    z = torch.zeros(2, 6, dtype=DT)

    def run(n, k):
        def go():
            res = fixed_point(f, x, (z, z), steps=n, algorithm="crbp", solver=solver, adjoint_solver=adjoint_solver,
                              adjoint_steps=k, adjoint_tol=0.0, trace=True)
            (res.state[0].sum() + res.penalty).backward()
            assert res.stats.trace.forward.shape[0] == n and res.stats.trace.adjoint.shape[0] == k
        return count_syncs(monkeypatch, go)

    few, many = run(4, 3), run(40, 30)
    assert few == many, (few, many)  # the same few reads (the finite check, the adjoint's verdict) at any N
    assert many <= 6, many
    # The counter does see reads: a tolerance reads one residual per step.
    def with_tol():
        fixed_point(f, x.detach(), (z, z), steps=20, tol=1e-30, trace=True)
    assert count_syncs(monkeypatch, with_tol) >= 19


def test_plot_trace_writes_pngs(tmp_path):
    f = Pair()
    x = torch.randn(2, 6, dtype=DT, requires_grad=True)
    z = torch.zeros(2, 6, dtype=DT)
    res = fixed_point(f, x, (z, z), steps=12, algorithm="rbp", trace=True)
    res.state[0].sum().backward()
    one = plot_trace(res.stats, tmp_path / "one.png", title="pair")
    assert one.stat().st_size > 1000
    other = fixed_point(f, x, (z, z), steps=12, algorithm="phantom", trace=True, phantom_steps=2)
    both = plot_trace({"rbp": res.stats, "phantom": other.stats.trace.as_dict()}, tmp_path / "both.png")
    assert both.stat().st_size > 1000
    with pytest.raises(ValueError, match=r"trace: these stats have no trace; run fixed_point\(\.\.\., trace=True\)"):
        plot_trace(fixed_point(f, x, (z, z), steps=3).stats, tmp_path / "none.png")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: counts device synchronisations")
def test_trace_on_cuda_adds_no_device_sync_per_step():
    """On a GPU, torch's sync debug mode warns at every synchronising call: the count does not grow with N."""
    import warnings

    f = Pair().cuda()
    x = torch.randn(2, 6, dtype=DT, device="cuda", requires_grad=True)
    z = torch.zeros(2, 6, dtype=DT, device="cuda")

    def syncs(n, k):
        res = fixed_point(f, x, (z, z), steps=n, algorithm="rbp", adjoint_steps=k, adjoint_tol=0.0, trace=True)
        loss = res.state[0].sum()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                res = fixed_point(f, x, (z, z), steps=n, algorithm="rbp", adjoint_steps=k, adjoint_tol=0.0, trace=True)
                res.state[0].sum().backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        del loss
        assert res.stats.trace.forward.shape[0] == n and res.stats.trace.adjoint.shape[0] == k
        return sum("synchroniz" in str(w.message) for w in seen)

    assert syncs(4, 3) == syncs(40, 30)
