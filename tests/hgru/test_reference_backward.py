"""The explicit passes of the tracked step's backward and of the LCP penalty's gradient
(hgru/reference.py: linearize_tracked, step_vjp, lcp_gradient) against autograd, in float64."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

from crbp_fast import HGRUCell, lcp_penalty
from crbp_fast.conv.engines import FFT
from crbp_fast.hgru import reference as ref

F64 = torch.float64
NORMS = [("batch", 1), ("group", 2), ("none", 1)]


def make(norm: str, groups: int, shape=(3, 4, 11, 13), k: int = 5):
    torch.manual_seed(0)
    cell = HGRUCell(shape[1], k, norm=norm, norm_groups=groups, backend="torch", conv="direct", dtype=F64)
    with torch.no_grad():
        for p in cell.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(shape, dtype=F64)
    h = torch.rand(shape, dtype=F64)
    return cell, x, h


def leaves(a, b):
    """Pairs of tensors of two StepGrads fields (a tensor, a (weight, bias) pair, or None for both)."""
    if a is None or b is None:
        assert a is None and b is None
        return []
    return [(a, b)] if isinstance(a, torch.Tensor) else list(zip(a, b))


def named_grads(cell: HGRUCell, grads: ref.StepGrads) -> dict[str, torch.Tensor]:
    """The explicit gradients under the cell's parameter names."""
    out = {
        "u1_gate.weight": grads.u1_weight, "u1_gate.bias": grads.u1_bias, "u2_gate.weight": grads.u2_weight,
        "u2_gate.bias": grads.u2_bias, "w_gate_inh": grads.w_inh, "w_gate_exc": grads.w_exc, "alpha": grads.alpha,
        "mu": grads.mu, "kappa": grads.kappa, "gamma": grads.gamma, "w": grads.omega,
    }
    if cell.norm != "none":
        out.update({"bn.1.weight": grads.norm_inh[0], "bn.1.bias": grads.norm_inh[1],
                    "bn.3.weight": grads.norm_exc[0], "bn.3.bias": grads.norm_exc[1]})
    return out


@pytest.mark.parametrize("norm, groups", NORMS, ids=[n for n, _ in NORMS])
def test_step_vjp_matches_autograd(norm, groups):
    cell, x, h = make(norm, groups)
    v = torch.randn_like(x)
    p = cell.params()
    f, t = ref.linearize_tracked(x, h, p)
    assert_close(f.state, ref.step(x, h, p), rtol=1e-13, name="state")
    grads = ref.step_vjp(v, f, t, p)
    xx, hh = x.clone().requires_grad_(), h.clone().requires_grad_()
    names, params = zip(*cell.named_parameters())
    auto = torch.autograd.grad(ref.step(xx, hh, cell.params()), (xx, hh, *params), v)
    assert_close(grads.x, auto[0], rtol=1e-12, name="x")
    assert_close(grads.h, auto[1], rtol=1e-12, name="h")
    explicit = named_grads(cell, grads)
    assert set(explicit) == set(names)
    for name, a in zip(names, auto[2:]):
        assert_close(explicit[name], a, rtol=1e-12, name=name)


def test_step_vjp_with_the_fft_engine():
    cell, x, h = make("batch", 1, shape=(2, 5, 16, 19), k=7)
    v = torch.randn_like(x)
    p = cell.params()
    direct = ref.step_vjp(v, *ref.linearize_tracked(x, h, p), p)
    f, t = ref.linearize_tracked(x, h, p, FFT.conv)
    fft = ref.step_vjp(v, f, t, p, FFT.conv_transpose, FFT.weight_grad)
    for name, a, b in zip(ref.StepGrads._fields, fft, direct):
        for a_i, b_i in leaves(a, b):
            assert_close(a_i, b_i, rtol=1e-10, name=name)


@pytest.mark.parametrize("norm, groups", NORMS, ids=[n for n, _ in NORMS])
def test_lcp_gradient_matches_double_backward(norm, groups):
    cell, x, h = make(norm, groups)
    target = 0.5  # some column sums above it, some below: relu's kink is exercised
    penalty, grads = ref.lcp_gradient(x, h, cell.params(), target)
    xx = x.clone().requires_grad_()
    names, params = zip(*cell.named_parameters())
    auto_penalty = lcp_penalty(cell, xx, h, target=target)
    assert 0 < float(auto_penalty.detach())
    assert_close(penalty, auto_penalty, rtol=1e-13, name="penalty")
    auto = torch.autograd.grad(auto_penalty, (xx, *params))
    assert_close(grads.x, auto[0], rtol=1e-11, name="x")
    explicit = named_grads(cell, grads)
    for name, a in zip(names, auto[1:]):
        assert_close(explicit[name], a, rtol=1e-11, name=name)


@pytest.mark.parametrize("norm, groups", NORMS, ids=[n for n, _ in NORMS])
def test_lcp_tangent_matches_forward_mode(norm, groups):
    """The hand-written tangents of lcp_tangent against autograd's forward mode through
    linearize_tracked and step_vjp, h included (which the double-backward test cannot see)."""
    cell, x, h = make(norm, groups, shape=(2, 4, 9, 12), k=3)
    p = cell.params()
    penalty, explicit = ref.lcp_gradient(x, h, p, 0.5)
    penalty_fm, forward = ref.lcp_gradient_forward_mode(x, h, p, 0.5)
    assert_close(penalty, penalty_fm, rtol=1e-14, name="penalty")
    for name, a, b in zip(ref.StepGrads._fields, explicit, forward):
        for a_i, b_i in leaves(a, b):
            assert_close(a_i, b_i, rtol=1e-11, name=name)


def test_column_sums_is_the_vjp_of_ones():
    cell, x, h = make("batch", 1)
    p = cell.params()
    u, _ = ref.column_sums(ref.linearize(x, h, p), p)
    assert_close(u, ref.vjp(torch.ones_like(h), ref.linearize(x, h, p), p), rtol=1e-14, name="u")


@pytest.mark.parametrize("forward_mode", [False, True], ids=["explicit", "forward-mode"])
def test_lcp_gradient_through_the_fft_engine(forward_mode):
    """Through the FFT engine (its forward-mode rules for the forward-mode route) the gradient
    equals the direct conv's."""
    cell, x, h = make("batch", 1, shape=(2, 4, 12, 13), k=5)
    p = cell.params()
    fn = ref.lcp_gradient_forward_mode if forward_mode else ref.lcp_gradient
    penalty, direct = ref.lcp_gradient(x, h, p, 0.5)
    with torch.no_grad():
        penalty_fft, fft = fn(x, h, p, 0.5, FFT.conv, FFT.conv_transpose, FFT.weight_grad)
    assert_close(penalty_fft, penalty, rtol=1e-12, name="penalty")
    for name, a, b in zip(ref.StepGrads._fields, fft, direct):
        for a_i, b_i in leaves(a, b):
            assert_close(a_i, b_i, rtol=1e-10, name=name)
