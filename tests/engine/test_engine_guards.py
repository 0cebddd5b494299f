"""The engine does not trust the module: what f(x, h) returns is checked, a non-finite state is
reported at the step it appeared, lcp_target is validated, and a diverged adjoint never hands the
optimizer a diverging sum (while a contractive cell whose adjoint terms grow for a while is not
called diverged)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from crbp_fast import AdjointDivergenceWarning, fixed_point, lcp_penalty


class Affine(nn.Module):
    """f(x, h) = h A^T + x on states (B, D): J = A, so the adjoint solution is (I - A^T)^-1 v."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.a = nn.Parameter(a.double())

    def forward(self, x, h):
        return h @ self.a.T + x


class Crop(nn.Module):
    def forward(self, x, h):
        return (0.5 * h + x)[..., 1:]


class BatchMean(nn.Module):
    def forward(self, x, h):
        return (0.5 * h + x).mean(0, keepdim=True)  # broadcasts against h: trains silently if unchecked


class ToFloat32(nn.Module):
    def forward(self, x, h):
        return (0.5 * h + x).float()


class ToTuple(nn.Module):
    def forward(self, x, h):
        return (0.5 * h + x,)


class ToMeta(nn.Module):
    def forward(self, x, h):
        return torch.empty_like(h, device="meta")


BAD_MODULES = [
    (Crop(), ValueError, r"f: expected f\(x, h\) to return a state of h's shape \(3, 4\), got \(3, 3\)"),
    (BatchMean(), ValueError, r"f: expected .* shape \(3, 4\), got \(1, 4\)"),
    (ToFloat32(), TypeError, "f: expected f\\(x, h\\) to return h's dtype torch.float64, got torch.float32"),
    (ToTuple(), TypeError, "f: expected f\\(x, h\\) to return a torch.Tensor like h, got tuple"),
    (ToMeta(), ValueError, "f: expected f\\(x, h\\) to return a state on h's device cpu, got meta"),
]


@pytest.mark.parametrize("module, error, match", BAD_MODULES, ids=["crop", "batch-mean", "dtype", "tuple", "device"])
@pytest.mark.parametrize("mode", ["crbp", "bptt", "no_grad", "anderson"])
def test_module_output_is_checked(module, error, match, mode):
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    kwargs = dict(steps=3, algorithm="bptt" if mode == "bptt" else "crbp")
    if mode == "anderson":
        kwargs["solver"] = "anderson"
    with pytest.raises(error, match=match):
        if mode == "no_grad":
            with torch.no_grad():
                fixed_point(module, x, **kwargs)
        else:
            fixed_point(module, x, **kwargs)


def test_linearize_vjp_of_wrong_shape_is_refused():
    class BadLinearize(Affine):
        def linearize(self, x, h):
            class Lin:
                state = self(x, h)
                vjp = staticmethod(lambda v: v[:, :1])
            return Lin()

    f = BadLinearize(0.5 * torch.eye(2))
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    res = fixed_point(f, x, steps=3, algorithm="rbp")
    with pytest.raises(ValueError, match=r"f.linearize: expected .vjp\(v\) to return a tensor of v's shape \(3, 2\)"):
        res.state.sum().backward()


class NaNAtCall(nn.Module):
    """0.5 h + x, except that evaluation number ``k`` returns NaN."""

    def __init__(self, k: int):
        super().__init__()
        self.k, self.calls = k, 0

    def forward(self, x, h):
        self.calls += 1
        out = 0.5 * h + x
        return out * float("nan") if self.calls == self.k else out


@pytest.mark.parametrize("solver", ["iteration", "anderson"])
def test_non_finite_state_is_reported_at_the_step_it_appeared(solver):
    with torch.no_grad(), pytest.raises(FloatingPointError, match="non-finite .* at forward step 4 of 10"):
        fixed_point(NaNAtCall(4), torch.randn(2, 3), steps=10, solver=solver)


@pytest.mark.parametrize("value, error", [(float("nan"), ValueError), (float("inf"), ValueError), (-0.5, ValueError),
                                          ("high", TypeError), (None, TypeError)])
def test_lcp_target_is_validated(value, error):
    f = Affine(0.5 * torch.eye(2))
    x = torch.randn(3, 2, dtype=torch.float64)
    with pytest.raises(error, match=f"lcp_target: expected .*got {value!r}"):
        fixed_point(f, x, steps=2, lcp_target=value)
    with pytest.raises(error, match=f"target: expected .*got {value!r}"):
        lcp_penalty(f, x, torch.zeros_like(x), target=value)


def _adjoint_grad(f, x, **kwargs):
    x_in = x.clone().requires_grad_(True)
    res = fixed_point(f, x_in, torch.zeros_like(x), steps=3, algorithm="rbp", **kwargs)
    res.state.sum().backward()
    return x_in.grad, res.stats


@pytest.mark.parametrize("adjoint_tol", [0.0, 1e-8], ids=["tol0", "tol1e-8"])
@pytest.mark.parametrize("a, adjoint_solver", [(1.5, "neumann"), (1e30, "neumann"), (1e30, "anderson")],
                         ids=["grows-neumann", "overflows-neumann", "overflows-anderson"])
def test_diverged_adjoint_returns_the_best_partial_sum(a, adjoint_solver, adjoint_tol):
    # J = a I with a > 1: every term is larger than the one before, so the best partial sum is
    # the first term, dL/dh_N = 1, and dL/dx = 1 through the tracked step's dF/dx = I. Before
    # the fix, tol=0 returned the whole diverging sum (1.5^60 ~ 4e10, or inf/NaN). (Anderson
    # solves the linear equation g = v + 1.5 g exactly, g = -2 v, so only overflow diverges it.)
    f = Affine(a * torch.eye(3))
    x = torch.randn(2, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the overflowing forward itself
        with pytest.warns(AdjointDivergenceWarning, match="best partial Neumann sum"):
            grad, stats = _adjoint_grad(f, x, adjoint_steps=60, adjoint_tol=adjoint_tol, adjoint_solver=adjoint_solver,
                                        check_finite=False)
    assert stats.adjoint_stop == "diverged"
    assert torch.equal(grad, torch.ones_like(grad))


def test_published_rule_on_non_finite_terms_returns_a_finite_gradient():
    f = Affine(1e200 * torch.eye(3))
    x = torch.randn(2, 3, dtype=torch.float64) * 1e-300
    with pytest.warns(AdjointDivergenceWarning):
        grad, stats = _adjoint_grad(f, x * 0, adjoint_steps=15, adjoint_rule="published", check_finite=False)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("adjoint_solver", ["neumann", "anderson"])
def test_contractive_cell_with_transient_growth_is_not_called_diverged(adjoint_solver):
    # A = [[0.9, 4], [0, 0.9]]: spectral radius 0.9 (contractive), but ||(A^T)^k v|| grows ~15x
    # over the first nine iterations before it shrinks. The old guard (3 growing iterations past
    # ||v_0||) stopped at iteration 3 and returned a gradient 94% off.
    a = torch.tensor([[0.9, 4.0], [0.0, 0.9]])
    f = Affine(a)
    x = torch.randn(1, 2, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdjointDivergenceWarning)
        x_in = x.clone().requires_grad_(True)
        res = fixed_point(f, x_in, torch.zeros_like(x), steps=3, algorithm="rbp", adjoint_steps=600,
                          adjoint_tol=1e-13, adjoint_solver=adjoint_solver)
        weight = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
        (res.state * weight).sum().backward()
    expected = torch.linalg.solve(torch.eye(2, dtype=torch.float64) - a.double().T, weight[0])
    assert res.stats.adjoint_stop == "tol", res.stats.as_dict()
    torch.testing.assert_close(x_in.grad[0], expected, rtol=1e-9, atol=1e-12)


def test_contractive_transient_growth_with_too_few_steps_is_flagged_not_summed():
    # Within a budget of 5 iterations the terms are still growing: no gradient estimate exists
    # yet, so the engine says so (diverged, best partial sum = the first term) rather than
    # returning a partial sum still far from the solution as if it were one.
    f = Affine(torch.tensor([[0.9, 4.0], [0.0, 0.9]]))
    x = torch.randn(1, 2, dtype=torch.float64)
    with pytest.warns(AdjointDivergenceWarning, match="more adjoint_steps"):
        x_in = x.clone().requires_grad_(True)
        res = fixed_point(f, x_in, torch.zeros_like(x), steps=3, algorithm="rbp", adjoint_steps=5, adjoint_tol=0)
        (res.state * torch.tensor([[1.0, 0.0]], dtype=torch.float64)).sum().backward()
    assert res.stats.adjoint_stop == "diverged"
    torch.testing.assert_close(x_in.grad, torch.tensor([[1.0, 0.0]], dtype=torch.float64))
