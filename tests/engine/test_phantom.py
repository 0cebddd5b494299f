"""algorithm="phantom": k damped steps h <- (1 - lambda) h + lambda F(x, h) from the detached fixed
point, differentiated by autograd. Memory O(k), constant in N; with lambda = 1 its gradient is the
Neumann series truncated after k terms and tends to the implicit gradient as k grows."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import saved_bytes

from crbp_fast import ConvLSTMCell, fixed_point

DT = torch.float64


class Contractive(nn.Module):
    """f(x, h) = tanh(h W^T + x) with ||W|| < 1: contractive, rate about 0.6."""

    def __init__(self, d: int = 8):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        w = torch.randn(d, d, generator=g, dtype=DT)
        self.w = nn.Parameter(0.6 * w / torch.linalg.matrix_norm(w, ord=2))

    def forward(self, x, h):
        return torch.tanh(h @ self.w.T + x)


def grads(f, x, **kw):
    res = fixed_point(f, x, **kw)
    h = res.state
    loss = (h * torch.linspace(-2, 1, h.numel(), dtype=DT).reshape(h.shape)).sum()
    return res, torch.autograd.grad(loss, [x, f.w])


def implicit(f, x):
    return grads(f, x, steps=100, algorithm="rbp", adjoint_steps=500, adjoint_tol=1e-15)[1]


def error(a, b) -> float:
    return max(float((u - v).abs().max() / v.abs().max()) for u, v in zip(a, b))


def test_undamped_phantom_tends_to_the_implicit_gradient_as_k_grows():
    f = Contractive()
    x = torch.randn(4, 8, dtype=DT, requires_grad=True)
    ref = implicit(f, x)
    errors = []
    for k in (1, 2, 4, 8, 16, 32):
        res, g = grads(f, x, steps=100, algorithm="phantom", phantom_steps=k, phantom_damping=1.0)
        assert res.stats.steps == 100 and res.penalty is None
        errors.append(error(g, ref))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 1e-2 and errors[-1] < 1e-6, errors


@pytest.mark.parametrize("k", [1, 3, 7])
def test_undamped_phantom_is_the_neumann_series_truncated_after_k_terms(k):
    """At a converged fixed point every tracked step has the same J, so k unrolled steps give
    g = sum_{j<k} (J^T)^j dL/dh: rbp with exactly k - 1 adjoint products."""
    f = Contractive()
    x = torch.randn(3, 8, dtype=DT, requires_grad=True)
    _, g = grads(f, x, steps=100, algorithm="phantom", phantom_steps=k, phantom_damping=1.0)
    _, r = grads(f, x, steps=100, algorithm="rbp", adjoint_steps=k - 1, adjoint_tol=0.0)
    for u, v in zip(g, r):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-14)


def test_damped_phantom_also_converges_and_keeps_the_fixed_point():
    f = Contractive()
    x = torch.randn(3, 8, dtype=DT, requires_grad=True)
    ref = implicit(f, x)
    res, g5 = grads(f, x, steps=100, algorithm="phantom", phantom_steps=5, phantom_damping=0.5)
    _, g60 = grads(f, x, steps=100, algorithm="phantom", phantom_steps=60, phantom_damping=0.5)
    assert error(g60, ref) < 1e-6 < error(g5, ref)
    with torch.no_grad():
        h_star = fixed_point(f, x, steps=100).state
    torch.testing.assert_close(res.state.detach(), h_star, rtol=1e-12, atol=1e-13)


def test_phantom_memory_grows_with_k_and_is_constant_in_n():
    cell = ConvLSTMCell(3, 4, 3)  # a two-tensor state
    x = torch.randn(2, 3, 12, 12)

    def run(n, k):
        def go():
            h, c = fixed_point(cell, x, steps=n, algorithm="phantom", phantom_steps=k, phantom_damping=0.5).state
            return h.square().mean() + c.mean()
        return saved_bytes(go)

    assert run(10, 3) == run(40, 3)
    k1, k2, k8 = run(20, 1), run(20, 2), run(20, 8)
    assert k1 < k2 < k8
    assert k8 == pytest.approx(8 * k1, rel=0.25), (k1, k8)  # about one step's activations per tracked step
    bptt20 = saved_bytes(lambda: fixed_point(cell, x, steps=20, algorithm="bptt").state[0].sum())
    assert run(20, 2) < bptt20 / 5


def test_phantom_with_anderson_and_its_argument_errors():
    f = Contractive()
    x = torch.randn(3, 8, dtype=DT, requires_grad=True)
    ref = implicit(f, x)
    res, g = grads(f, x, steps=60, algorithm="phantom", solver="anderson", tol=1e-13, phantom_steps=30,
                   phantom_damping=1.0)
    assert res.stats.steps < 60 and error(g, ref) < 1e-5  # Anderson stopped early, then 30 tracked steps
    with pytest.raises(ValueError, match=r"phantom_steps: expected an int in 1..steps=4, got 5"):
        fixed_point(f, x, steps=4, algorithm="phantom", phantom_steps=5)
    with pytest.raises(ValueError, match=r"phantom_steps: expected an int in 1..steps=4, got 0"):
        fixed_point(f, x, steps=4, algorithm="phantom", phantom_steps=0)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=rf"phantom_damping: expected a number in \(0, 1\], got {bad}"):
            fixed_point(f, x, steps=4, algorithm="phantom", phantom_steps=2, phantom_damping=bad)
    with pytest.raises(ValueError, match=r"algorithm: expected one of \('bptt', 'cbptt', 'rbp', 'crbp', 'phantom'\)"):
        fixed_point(f, x, algorithm="ift")
