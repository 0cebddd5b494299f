"""The fixed-point engine against mathematics: implicit-function-theorem gradients from a dense
Jacobian solve in float64, the LCP against dense column sums, and O(1) memory for RBP/C-RBP."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from conftest import assert_close, saved_bytes

from crbp_fast import AdjointDivergenceWarning, HGRUCell, fixed_point, lcp_penalty


def contractive_cell(norm: str = "batch", c: int = 3, k: int = 3) -> HGRUCell:
    """A tiny float64 hGRU whose step is a contraction (spectral radius well below 1)."""
    cell = HGRUCell(c, k, norm=norm, backend="torch", conv="direct", norm_groups=1).double()
    with torch.no_grad():
        for p in cell.parameters():
            p.add_(0.1 * torch.randn_like(p))
        cell.u2_gate.bias.fill_(1.0)
        cell.w_gate_exc.mul_(0.3)
        cell.w_gate_inh.mul_(0.3)
        cell.kappa.fill_(0.2)
        cell.w.fill_(0.2)
    return cell


def dense_jacobian(f, x, h):
    n = h.numel()
    return torch.autograd.functional.jacobian(lambda hh: f(x, hh), h).reshape(n, n)


def converge(f, x, steps=400):
    h = torch.zeros_like(x)
    with torch.no_grad():
        for _ in range(steps):
            h = f(x, h)
    return h


def ift_gradients(f, x, weight):
    """dL/d(theta, x) at h* = F(x, h*) for L = sum(weight * h*), by (I - J^T) g = dL/dh*."""
    h_star = converge(f, x)
    jac = dense_jacobian(f, x, h_star)
    assert torch.linalg.eigvals(jac).abs().max() < 0.8, "test problem is not contractive enough"
    eye = torch.eye(jac.shape[0], dtype=jac.dtype)
    g = torch.linalg.solve(eye - jac.T, weight.reshape(-1)).reshape(h_star.shape)
    x_in = x.detach().requires_grad_(True)
    params = [p for p in f.parameters()]
    out = f(x_in, h_star)
    grads = torch.autograd.grad(out, params + [x_in], g)
    return dict(zip([n for n, _ in f.named_parameters()] + ["x"], grads)), jac, h_star


def engine_gradients(f, x, weight, **kwargs):
    x_in = x.detach().requires_grad_(True)
    f.zero_grad()
    res = fixed_point(f, x_in, **kwargs)
    (res.state * weight).sum().backward()
    out = {n: p.grad.clone() for n, p in f.named_parameters()}
    out["x"] = x_in.grad.clone()
    return out, res


@pytest.mark.parametrize("norm", ["batch", "none"])
@pytest.mark.parametrize("algorithm", ["rbp", "crbp"])
@pytest.mark.parametrize("adjoint_solver", ["neumann", "anderson"])
def test_implicit_gradient_matches_dense_solve(norm, algorithm, adjoint_solver):
    torch.manual_seed(1)
    f = contractive_cell(norm)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    weight = torch.randn_like(x)
    expected, _, _ = ift_gradients(f, x, weight)
    got, res = engine_gradients(
        f, x, weight, steps=200, algorithm=algorithm, adjoint_solver=adjoint_solver,
        adjoint_steps=500, adjoint_tol=1e-13,
    )
    assert res.stats.adjoint_stop == "tol", res.stats.as_dict()
    assert res.stats.adjoint_iterations < 500
    for name, g in expected.items():
        assert_close(got[name], g, rtol=1e-6, name=name)


def test_bptt_with_large_n_approaches_implicit_gradient():
    torch.manual_seed(2)
    f = contractive_cell("batch")
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    weight = torch.randn_like(x)
    expected, _, _ = ift_gradients(f, x, weight)
    errors = []
    for steps in (3, 60):
        got, _ = engine_gradients(f, x, weight, steps=steps, algorithm="bptt")
        e, g = expected["w_gate_exc"], got["w_gate_exc"]
        errors.append(float((g - e).norm() / e.norm()))
    assert errors[1] < 1e-6 and errors[1] < errors[0], errors


def test_truncated_adjoint_runs_exactly_adjoint_steps():
    f = contractive_cell()
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    for solver in ("neumann", "anderson"):
        _, res = engine_gradients(f, x, torch.ones_like(x), steps=10, adjoint_steps=7, adjoint_tol=0, adjoint_solver=solver)
        assert res.stats.adjoint_iterations == 7 and res.stats.adjoint_stop == "max_steps"
        assert res.stats.backward_calls == 1


def test_published_stopping_rule_stops_early_on_scale():
    f = contractive_cell()
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    # The published rules are scale dependent: with a loss this large ||g|| > 1 at once.
    _, res = engine_gradients(f, x, 100 * torch.ones_like(x), steps=10, adjoint_steps=15, adjoint_rule="published")
    assert res.stats.adjoint_stop == "published" and res.stats.adjoint_iterations == 1


class Linear(nn.Module):
    """f(x, h) = a * h + x: J = a I, contractive for |a| < 1."""

    def __init__(self, a: float):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))

    def forward(self, x, h):
        return self.a * h + x


def test_diverging_adjoint_warns_and_says_so_in_stats():
    f = Linear(1.5)
    x = torch.randn(2, 3, dtype=torch.float64)
    x_in = x.clone().requires_grad_(True)
    res = fixed_point(f, x_in, torch.zeros_like(x), steps=3, algorithm="rbp", adjoint_steps=30, adjoint_tol=1e-8)
    with pytest.warns(AdjointDivergenceWarning, match="not contractive"):
        res.state.sum().backward()
    assert res.stats.adjoint_stop == "diverged"
    assert torch.isfinite(x_in.grad).all()


def test_linear_problem_gradient_is_geometric_series():
    a = 0.5
    f = Linear(a)
    x = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    res = fixed_point(f, x, torch.zeros_like(x), steps=80, algorithm="rbp", adjoint_steps=200, adjoint_tol=1e-14)
    res.state.sum().backward()
    # h* = x / (1 - a): dL/dx = 1 / (1 - a), dL/da = sum(x) / (1 - a)^2
    assert_close(x.grad, torch.full_like(x, 1 / (1 - a)), rtol=1e-12, name="dx")
    assert_close(f.a.grad, x.detach().sum() / (1 - a) ** 2, rtol=1e-10, name="da")


@pytest.mark.parametrize("norm", ["batch", "none"])
def test_lcp_penalty_equals_dense_column_sums(norm):
    f = contractive_cell(norm)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    h = torch.rand_like(x)
    target = 0.05  # low enough that some column sums exceed it
    jac = dense_jacobian(f, x, h)
    expected = torch.relu(jac.sum(dim=0) - target).pow(2).mean()
    penalty = lcp_penalty(f, x, h, target=target)
    assert float(expected) > 0
    assert_close(penalty.detach(), expected, rtol=1e-12, name="lcp")


def test_lcp_penalty_parameter_gradient_matches_finite_differences():
    f = contractive_cell("batch")
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    h = torch.rand_like(x)
    target = 0.05
    penalty = lcp_penalty(f, x, h, target=target)
    params = [f.w_gate_exc, f.alpha, f.u2_gate.weight]
    grads = torch.autograd.grad(penalty, params)
    gen = torch.Generator().manual_seed(0)
    for p, g in zip(params, grads):
        direction = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        eps = 1e-6
        with torch.no_grad():
            p.add_(eps * direction)
            up = lcp_penalty(f, x, h, target=target)
            p.sub_(2 * eps * direction)
            down = lcp_penalty(f, x, h, target=target)
            p.add_(eps * direction)
        fd = (up - down) / (2 * eps)
        assert_close((g * direction).sum(), fd, rtol=1e-6, name="directional derivative")


def test_crbp_penalty_is_lcp_at_tracked_step_and_trains():
    f = contractive_cell()
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    res = fixed_point(f, x, steps=6, algorithm="crbp", lcp_target=0.05)
    h_prev = fixed_point(f, x, steps=5, algorithm="rbp").state.detach()
    assert_close(res.penalty.detach(), lcp_penalty(f, x, h_prev, target=0.05).detach(), rtol=1e-12, name="penalty")
    res.penalty.backward()
    assert f.w_gate_exc.grad is not None and f.w_gate_exc.grad.abs().sum() > 0


def test_memory_is_constant_in_steps_for_rbp_and_crbp():
    cell = HGRUCell(4, 3, backend="torch", conv="direct")
    x = torch.randn(2, 4, 16, 16)

    def run(alg, n):
        def go():
            res = fixed_point(cell, x, steps=n, algorithm=alg)
            loss = res.state.square().mean() + (res.penalty if res.penalty is not None else 0)
            return loss
        return saved_bytes(go)

    for alg in ("rbp", "crbp"):
        assert run(alg, 4) == run(alg, 32), alg
    bptt4, bptt32 = run("bptt", 4), run("bptt", 32)
    assert bptt32 >= 6 * bptt4, (bptt4, bptt32)
    assert run("crbp", 32) < bptt32 / 6


def test_gradient_flows_to_what_produced_x():
    torch.manual_seed(3)
    f = contractive_cell()
    image = torch.randn(2, 1, 7, 7, dtype=torch.float64, requires_grad=True)
    encoder = nn.Conv2d(1, 3, 3, padding=1).double()
    weight = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    x = encoder(image) ** 2
    res = fixed_point(f, x, steps=200, algorithm="rbp", adjoint_steps=500, adjoint_tol=1e-13)
    (res.state * weight).sum().backward(retain_graph=True)
    expected, _, _ = ift_gradients(f, x.detach(), weight)
    (dimage,) = torch.autograd.grad(x, image, expected["x"])
    assert_close(image.grad, dimage, rtol=1e-6, name="d image")


def test_same_cell_twice_in_one_loss():
    f = contractive_cell()
    x1, x2 = torch.randn(2, 3, 7, 7, dtype=torch.float64), torch.randn(2, 3, 7, 7, dtype=torch.float64)
    kw = dict(steps=100, algorithm="crbp", adjoint_steps=300, adjoint_tol=1e-13)

    def grads(xs):
        f.zero_grad()
        loss = sum(fixed_point(f, x, **kw).state.square().sum() for x in xs)
        loss.backward()
        return [p.grad.clone() for p in f.parameters()]

    both, first, second = grads([x1, x2]), grads([x1]), grads([x2])
    for g, a, b in zip(both, first, second):
        assert_close(g, a + b, rtol=1e-10, name="sum of two solves")


@pytest.mark.parametrize("algorithm", ["bptt", "cbptt", "rbp", "crbp"])
def test_no_grad_and_eval_keep_no_graph_and_no_penalty(algorithm):
    cell = HGRUCell(3, 3)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        res = fixed_point(cell, x, steps=5, algorithm=algorithm)
    assert res.penalty is None and not res.state.requires_grad and res.stats.steps == 5
    cell.eval()
    res = fixed_point(cell, x, steps=5, algorithm=algorithm)
    assert res.penalty is None
    cell.train()
    res = fixed_point(cell, x, steps=5, algorithm=algorithm)
    assert (res.penalty is not None) == (algorithm in ("cbptt", "crbp"))
    assert res.state.requires_grad


def test_forward_stats_report_per_sample_relative_residual():
    f = contractive_cell()
    x = torch.randn(3, 3, 7, 7, dtype=torch.float64)
    res = fixed_point(f, x, steps=8, algorithm="rbp")
    h7 = fixed_point(f, x, steps=7, algorithm="rbp").state.detach()
    h8 = res.state.detach()
    expected = (h8 - h7).flatten(1).norm(dim=1) / h8.flatten(1).norm(dim=1)
    assert res.stats.forward_residual.shape == (3,)
    assert_close(res.stats.forward_residual.double(), expected, rtol=1e-6, name="residual")


def test_anderson_forward_converges_faster_than_iteration():
    torch.manual_seed(4)
    cell = HGRUCell(3, 3, norm="none", backend="torch", conv="direct").double()  # slow: radius ~0.99
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        plain = fixed_point(cell, x, steps=30, solver="iteration")
        acc = fixed_point(cell, x, steps=30, solver="anderson", anderson_window=5)
        early = fixed_point(cell, x, steps=200, solver="anderson", tol=1e-8)
    assert acc.stats.max_forward_residual < plain.stats.max_forward_residual / 10
    assert early.stats.steps < 200 and early.stats.max_forward_residual < 1e-7


def test_anderson_rbp_gradient_matches_iteration():
    f = contractive_cell()
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    w = torch.randn_like(x)
    a, _ = engine_gradients(f, x, w, steps=200, adjoint_steps=500, adjoint_tol=1e-13)
    b, res = engine_gradients(f, x, w, steps=60, solver="anderson", tol=1e-13, adjoint_steps=500, adjoint_tol=1e-13)
    assert res.stats.steps <= 60
    for name in a:
        assert_close(b[name], a[name], rtol=1e-6, name=name)


class Blowup(nn.Module):
    """Finite for two steps, then one element becomes ``value``."""

    def __init__(self, value: float = float("nan")):
        super().__init__()
        self.calls = 0
        self.value = value

    def forward(self, x, h):
        self.calls += 1
        out = h + x
        if self.calls >= 3:
            out = out.clone()
            out.view(-1)[1] = self.value
        return out


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("algorithm", ["bptt", "rbp"])
def test_non_finite_state_names_the_step(algorithm, dtype, value):
    x = torch.randn(2, 3, dtype=dtype)
    with pytest.raises(FloatingPointError, match="step 3 of 5"):
        fixed_point(Blowup(value), x, steps=5, algorithm=algorithm)


def test_huge_finite_float32_state_is_not_called_non_finite():
    """The float32 check sums in float64, which cannot overflow on float32 values."""
    x = torch.full((2, 3, 64, 64), 3e38)
    res = fixed_point(lambda x, h: x, x, steps=2, algorithm="rbp")
    assert torch.isfinite(res.state).all()


def test_divergence_warning_is_not_raised_for_contractive_problem():
    f = contractive_cell()
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine_gradients(f, x, torch.ones_like(x), steps=10, adjoint_steps=15)


def test_linearize_and_autograd_adjoints_agree():
    f = contractive_cell()
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    w = torch.randn_like(x)
    kw = dict(steps=30, algorithm="crbp", adjoint_steps=200, adjoint_tol=1e-13)
    a, _ = engine_gradients(f, x, w, use_linearize=True, **kw)
    b, _ = engine_gradients(f, x, w, use_linearize=False, **kw)
    for name in a:
        assert_close(a[name], b[name], rtol=1e-10, name=name)


def test_stats_as_dict_is_json_ready():
    import json

    f = contractive_cell()
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    res = fixed_point(f, x, steps=4)
    res.state.sum().backward()
    d = json.loads(json.dumps(res.stats.as_dict()))
    assert d["algorithm"] == "crbp" and d["steps"] == 4 and len(d["forward_residual"]) == 2
    assert d["adjoint_iterations"] >= 1 and d["backward_calls"] == 1


@pytest.mark.parametrize("steps", [1, 3])
def test_cbptt_penalty_is_lcp_at_last_step(steps):
    f = contractive_cell()
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    res = fixed_point(f, x, steps=steps, algorithm="cbptt", lcp_target=0.05)
    with torch.no_grad():
        h_prev = fixed_point(f, x, steps=steps - 1, algorithm="bptt").state if steps > 1 else torch.zeros_like(x)
    assert_close(res.penalty.detach(), lcp_penalty(f, x, h_prev, target=0.05).detach(), rtol=1e-12, name="penalty")
    res.penalty.backward()
    assert f.alpha.grad is not None and torch.isfinite(f.alpha.grad).all()
