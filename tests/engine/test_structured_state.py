"""Structured states (tuples / nested dicts of tensors) through fixed_point, the solvers, the LCP
and the stats: gradients against a dense-Jacobian solve, O(1) memory, malformed structures named."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

from conftest import saved_bytes

from crbp_fast import ConvLSTMCell, fixed_point, lcp_penalty

DT = torch.float64


class TwoTensor(nn.Module):
    """A contractive coupled pair: a' = tanh(W a + U b + x), b' = 0.5 b + 0.3 sigma(V a) (B, D) each."""

    def __init__(self, d: int = 5, scale: float = 0.3):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(scale * torch.randn(d, d, generator=g, dtype=DT) / d ** 0.5)
        self.u = nn.Parameter(scale * torch.randn(d, d, generator=g, dtype=DT) / d ** 0.5)
        self.v = nn.Parameter(scale * torch.randn(d, d, generator=g, dtype=DT) / d ** 0.5)

    def forward(self, x, state):
        a, b = state
        return torch.tanh(a @ self.w.T + b @ self.u.T + x), 0.5 * b + 0.3 * torch.sigmoid(a @ self.v.T)


class DictState(TwoTensor):
    """The same map on a nested state {"a": a, "rest": [b]}."""

    def forward(self, x, state):
        a, b = super().forward(x, (state["a"], state["rest"][0]))
        return {"a": a, "rest": [b]}


def dense_implicit_grads(f, x, state_star, loss_fn):
    """Parameter and x gradients from the dense solve (I - J^T) g = dL/dh*, J = dF/dh at h*."""
    leaves = [s.detach() for s in state_star]
    sizes = [s.numel() for s in leaves]

    def F_flat(z):
        parts = [p.reshape(s.shape) for p, s in zip(z.split(sizes), leaves)]
        return torch.cat([o.reshape(-1) for o in f(x.detach(), tuple(parts))])

    z = torch.cat([s.reshape(-1) for s in leaves])
    jac = torch.autograd.functional.jacobian(F_flat, z)
    zr = z.clone().requires_grad_(True)
    parts = [p.reshape(s.shape) for p, s in zip(zr.split(sizes), leaves)]
    (dl,) = torch.autograd.grad(loss_fn(tuple(parts)), zr)
    g = torch.linalg.solve(torch.eye(len(z), dtype=DT) - jac.T, dl)
    params = dict(f.named_parameters())
    xr = x.detach().clone().requires_grad_(True)
    out = functional_call(f, params, (xr, tuple(s for s in leaves)))
    flat_out = torch.cat([o.reshape(-1) for o in out])
    grads = torch.autograd.grad(flat_out, [*params.values(), xr], g)
    return dict(zip([*params.keys(), "x"], grads))


def loss_of(state):
    a, b = state
    return (a.sin() * torch.arange(a.numel(), dtype=DT).reshape(a.shape)).sum() + (b ** 2).sum()


@pytest.mark.parametrize("algorithm, adjoint_solver", [("rbp", "neumann"), ("crbp", "neumann"), ("rbp", "anderson")])
def test_two_tensor_gradient_matches_dense_jacobian_solve(algorithm, adjoint_solver):
    f = TwoTensor()
    x = torch.randn(3, 5, dtype=DT, requires_grad=True)
    res = fixed_point(f, x, (torch.zeros(3, 5, dtype=DT), torch.zeros(3, 5, dtype=DT)), steps=80,
                      algorithm=algorithm, adjoint_steps=300, adjoint_tol=1e-14, adjoint_solver=adjoint_solver,
                      lcp_target=10.0)
    assert isinstance(res.state, tuple) and len(res.state) == 2
    assert res.stats.max_forward_residual < 1e-13
    loss_of(res.state).backward()  # the penalty (target 10: zero) is not in the loss
    expected = dense_implicit_grads(f, x, res.state, loss_of)
    for name, p in [*f.named_parameters(), ("x", x)]:
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-9, atol=1e-11, msg=name)
    assert res.stats.adjoint_stop == "tol" and res.stats.adjoint_residual < 1e-13


def test_nested_dict_state_gives_the_same_state_and_gradients_as_the_tuple():
    f, g = TwoTensor(), DictState()
    x1 = torch.randn(3, 5, dtype=DT, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    z = torch.zeros(3, 5, dtype=DT)
    for solver in ("iteration", "anderson"):
        r1 = fixed_point(f, x1, (z, z), steps=30, algorithm="rbp", solver=solver, adjoint_tol=1e-12, adjoint_steps=200)
        r2 = fixed_point(g, x2, {"a": z, "rest": [z]}, steps=30, algorithm="rbp", solver=solver, adjoint_tol=1e-12,
                         adjoint_steps=200)
        assert set(r2.state) == {"a", "rest"} and isinstance(r2.state["rest"], list)
        torch.testing.assert_close(r1.state[0], r2.state["a"], rtol=0, atol=0)
        torch.testing.assert_close(r1.state[1], r2.state["rest"][0], rtol=0, atol=0)
        loss_of(r1.state).backward()
        loss_of((r2.state["a"], r2.state["rest"][0])).backward()
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(f.w.grad, g.w.grad, rtol=1e-12, atol=1e-14)
        x1.grad = x2.grad = None
        f.zero_grad(), g.zero_grad()


def test_anderson_forward_on_a_tuple_reaches_the_iteration_fixed_point():
    f = TwoTensor(scale=0.6)
    x = torch.randn(4, 5, dtype=DT, generator=torch.Generator().manual_seed(1))
    z = torch.zeros(4, 5, dtype=DT)
    with torch.no_grad():
        it = fixed_point(f, x, (z, z), steps=400)
        an = fixed_point(f, x, (z, z), steps=400, solver="anderson", tol=1e-12)
    assert it.stats.max_forward_residual < 1e-13
    assert an.stats.steps < it.stats.steps / 4, (an.stats.steps, it.stats.steps)
    for a, b in zip(it.state, an.state):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert an.stats.forward_residual.shape == (4,) and float(an.stats.forward_residual.max()) < 1e-11


def test_bptt_on_a_tuple_equals_the_hand_unrolled_gradient():
    f = TwoTensor()
    x = torch.randn(2, 5, dtype=DT, requires_grad=True)
    z = torch.zeros(2, 5, dtype=DT)
    res = fixed_point(f, x, (z, z), steps=6, algorithm="bptt")
    (gx,) = torch.autograd.grad(loss_of(res.state), x)
    state = (z, z)
    for _ in range(6):
        state = f(x, state)
    (ex,) = torch.autograd.grad(loss_of(state), x)
    torch.testing.assert_close(gx, ex, rtol=0, atol=0)
    # The per-sample residual spans both tensors.
    prev = (z, z)
    for _ in range(5):
        prev = f(x, prev)
    num = ((state[0] - prev[0]).pow(2).sum(1) + (state[1] - prev[1]).pow(2).sum(1)).sqrt()
    den = (state[0].pow(2).sum(1) + state[1].pow(2).sum(1)).sqrt()
    torch.testing.assert_close(res.stats.forward_residual, (num / den).float().to(res.stats.forward_residual.dtype),
                               rtol=1e-6, atol=1e-12)


def test_lcp_on_a_tuple_is_the_dense_column_sum_penalty():
    f = TwoTensor(scale=1.5)
    x = torch.randn(2, 5, dtype=DT)
    a, b = torch.randn(2, 5, dtype=DT), torch.randn(2, 5, dtype=DT)

    def F_flat(z):
        out = f(x, (z[:10].reshape(2, 5), z[10:].reshape(2, 5)))
        return torch.cat([o.reshape(-1) for o in out])

    jac = torch.autograd.functional.jacobian(F_flat, torch.cat([a.reshape(-1), b.reshape(-1)]))
    for target in (0.0, 0.5):
        expected = torch.relu(jac.sum(0) - target).pow(2).mean()
        got = lcp_penalty(f, x, (a, b), target=target)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    # crbp's penalty is the LCP at the tracked step, differentiable in the parameters.
    z = torch.zeros(2, 5, dtype=DT)
    res = fixed_point(f, x, (z, z), steps=4, algorithm="crbp", lcp_target=0.5)
    state3 = fixed_point(f, x, (z, z), steps=3, algorithm="bptt").state
    torch.testing.assert_close(res.penalty.detach(), lcp_penalty(f, x, state3, target=0.5).detach(), rtol=1e-12, atol=0)
    (gw,) = torch.autograd.grad(res.penalty, f.w)
    assert gw.abs().sum() > 0


def test_memory_is_constant_in_steps_for_rbp_and_crbp_with_a_two_tensor_state():
    cell = ConvLSTMCell(3, 4, 3)
    x = torch.randn(2, 3, 12, 12)

    def run(alg, n):
        def go():
            res = fixed_point(cell, x, steps=n, algorithm=alg)
            h, c = res.state
            return h.square().mean() + c.mean() + (res.penalty if res.penalty is not None else 0)
        return saved_bytes(go)

    for alg in ("rbp", "crbp"):
        assert run(alg, 4) == run(alg, 32), alg
    bptt4, bptt32 = run("bptt", 4), run("bptt", 32)
    assert bptt32 >= 6 * bptt4, (bptt4, bptt32)
    assert run("crbp", 32) < bptt32 / 6


def test_malformed_structures_are_named():
    f = TwoTensor()
    x = torch.randn(3, 5, dtype=DT)
    z = torch.zeros(3, 5, dtype=DT)
    with pytest.raises(TypeError, match=r"h0: expected a torch.Tensor or None, or a \(nested\) tuple.*got tuple\(\*, \*\) "
                                        r"with leaves \[\(3, 5\), 'float'\] \(float is not a tensor\)"):
        fixed_point(f, x, (z, 0.0))
    with pytest.raises(ValueError, match=r"h0: expected every tensor to have the batch size 3 of the first, got "
                                         r"tuple\(\*, \*\) with leaves \[\(3, 5\), \(2, 5\)\]"):
        fixed_point(f, x, (z, z[:2]))
    with pytest.raises(TypeError, match=r"h0: expected floating tensors, got torch.int64 \(leaf 1 of tuple\(\*, \*\)\)"):
        fixed_point(f, x, (z, z.long()))
    with pytest.raises(TypeError, match=r"h0: expected every tensor to have the dtype torch.float64 of the first, got "
                                        r"torch.float32 \(leaf 1"):
        fixed_point(f, x, (z, z.float()))
    with pytest.raises(ValueError, match=r"h0: expected .* got tuple\(\) with leaves \[\] \(no tensors\)"):
        fixed_point(f, x, ())

    class Swap(TwoTensor):
        def forward(self, x, state):
            return list(super().forward(x, state))

    with pytest.raises(TypeError, match=r"f: expected f\(x, h\) to return a state of h's structure, tuple\(\*, \*\) "
                                        r"with leaf shapes \[\(3, 5\), \(3, 5\)\], got list\(\*, \*\)"):
        fixed_point(Swap(), x, (z, z), steps=2)

    class Shrink(TwoTensor):
        def forward(self, x, state):
            a, b = super().forward(x, state)
            return a, b[:, :4]

    with pytest.raises(ValueError, match=r"f: expected f\(x, h\) to return a state of h's shape \(3, 5\) \(leaf 1\), "
                                         r"got \(3, 4\)"):
        fixed_point(Shrink(), x, (z, z), steps=2, algorithm="bptt")
    with pytest.raises(TypeError, match=r"h0: expected an initial state when x is a structure"):
        fixed_point(f, (x, x), None)
    with pytest.raises(TypeError, match=r"h: expected .* got tuple\(\*, \*\) with leaves \[\(3, 5\), 'str'\]"):
        lcp_penalty(f, x, (z, "c"))
