"""HGRUCell.tracked_step (crbp_fast/hgru/tracked.py): the tracked step and the LCP penalty as
one node with an explicit backward, against autograd through the reference (double backward
for the penalty), on odd sizes, every norm, both conv engines."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import assert_close

from crbp_fast import HGRUCell, lcp_penalty

F64 = torch.float64


def _native_built() -> bool:
    try:
        from crbp_fast.hgru.native import _C  # noqa: F401
    except ImportError:
        return False
    return True


# The native backend's fused passes, where the extension is built (CRBP_FAST_NO_EXT=1 builds none).
BACKENDS = ["torch", pytest.param("native", marks=pytest.mark.skipif(
    not _native_built(), reason="built without the native extension (CRBP_FAST_NO_EXT=1)")),
    pytest.param("triton", marks=pytest.mark.skipif(
        importlib.util.find_spec("triton") is None, reason="triton is not installed"))]
CASES = [("batch", 1, "direct"), ("group", 2, "direct"), ("none", 1, "direct"), ("batch", 1, "fft")]


def make(norm, groups, conv, dtype=F64, shape=(3, 4, 11, 13), k=5, backend="auto"):
    torch.manual_seed(0)
    cell = HGRUCell(shape[1], k, norm=norm, norm_groups=groups, backend=backend, conv=conv, dtype=dtype)
    with torch.no_grad():
        for p in cell.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return cell, torch.randn(shape, dtype=dtype), torch.rand(shape, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm, groups, conv", CASES, ids=[f"{n}-{c}" for n, _, c in CASES])
@pytest.mark.parametrize("terms", ["both", "state", "penalty"])
def test_tracked_step_gradients_match_autograd(norm, groups, conv, terms, backend):
    """backend="torch": the reference passes; "native": its fused CPU passes (native/tracked.py);
    "triton": its plane kernels (triton/tracked.py; on CPU under the interpreter)."""
    cell, x, h = make(norm, groups, conv, backend=backend)
    v = torch.randn_like(x)
    target = 0.5  # some column sums above, some below
    sv, sp = (terms != "penalty"), (terms != "state")
    params = list(cell.parameters())
    xx, hh = x.clone().requires_grad_(), h.clone().requires_grad_()
    out, penalty = cell.tracked_step(xx, hh, target)
    assert out.grad_fn is not None and "TrackedStep" in type(out.grad_fn).__name__
    loss = (out * v).sum() * sv + 3.0 * penalty * sp
    got = torch.autograd.grad(loss, (xx, *params))
    xr = x.clone().requires_grad_()
    ref_out = cell(xr, h)
    ref_pen = lcp_penalty(cell, xr, h, target=target)
    assert_close(out, ref_out, rtol=1e-13, name="state")
    assert_close(penalty, ref_pen, rtol=1e-12, name="penalty")
    assert float(ref_pen.detach()) > 0
    want = torch.autograd.grad((ref_out * v).sum() * sv + 3.0 * ref_pen * sp, (xr, *params))
    names = ["x"] + [n for n, _ in cell.named_parameters()]
    for name, a, b in zip(names, got, want):
        assert torch.isfinite(a).all(), name
        assert_close(a, b, rtol=1e-10, name=name)
    if sv and not sp:  # the h gradient of <v, F> is the VJP
        (gh,) = torch.autograd.grad((cell.tracked_step(x, hh) * v).sum(), hh)
        (gh_ref,) = torch.autograd.grad((cell(x, hh) * v).sum(), hh)
        assert_close(gh, gh_ref, rtol=1e-11, name="h")


def test_tracked_step_without_target_is_the_step():
    cell, x, h = make("batch", 1, "fft")
    out = cell.tracked_step(x, h)
    assert isinstance(out, torch.Tensor)
    assert_close(out, cell(x, h), rtol=1e-14, name="state")


def test_tracked_step_in_float32_matches_float64():
    cell, x, h = make("batch", 1, "fft", shape=(2, 5, 17, 19), k=7)
    c32 = HGRUCell(5, 7, conv="fft").to(torch.float32)
    c32.load_state_dict({k: v.float() for k, v in cell.state_dict().items()})
    out, pen = c32.tracked_step(x.float().requires_grad_(), h.float(), 0.5)
    g32 = torch.autograd.grad(out.sum() + pen, list(c32.parameters()))
    out64, pen64 = cell.tracked_step(x.requires_grad_(), h, 0.5)
    g64 = torch.autograd.grad(out64.sum() + pen64, list(cell.parameters()))
    for (name, _), a, b in zip(cell.named_parameters(), g32, g64):
        assert torch.isfinite(a).all(), name
        assert_close(a.double(), b, rtol=2e-4, atol=1e-6, name=name)


def test_tracked_step_refuses_a_second_derivative_and_sees_in_place_changes():
    cell, x, h = make("none", 1, "direct")
    xx = x.clone().requires_grad_()
    out, pen = cell.tracked_step(xx, h, 0.5)
    (g,) = torch.autograd.grad(pen, xx, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad|second"):
        torch.autograd.grad(g.sum(), xx)
    out, pen = cell.tracked_step(xx, h, 0.5)
    with torch.no_grad():
        cell.alpha.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        pen.backward()


def test_tracked_step_under_no_grad_and_half_precision_fallback():
    cell, x, h = make("batch", 1, "direct")
    with torch.no_grad():
        out, pen = cell.tracked_step(x, h, 0.5)
    assert out.grad_fn is None and pen.grad_fn is None
    assert_close(pen, lcp_penalty(cell, x, h, target=0.5), rtol=1e-12, name="penalty")
    cell16, x16, h16 = make("batch", 1, "direct", dtype=torch.bfloat16)
    out, pen = cell16.tracked_step(x16.requires_grad_(), h16, 0.5)
    assert "TrackedStep" not in type(out.grad_fn).__name__  # autograd route
    pen.backward()
    assert x16.grad is not None and torch.isfinite(x16.grad.float()).all()


@pytest.mark.parametrize("conv", ["direct", "fft"])
@pytest.mark.parametrize("algorithm", ["rbp", "crbp"])
def test_fixed_point_with_the_explicit_tracked_step_matches_the_autograd_route(conv, algorithm):
    """fixed_point's default (the cell's tracked_step: one node for the step and the penalty)
    against use_linearize=False (autograd through the step, the penalty by double backward, the
    published route): the same loss gradient in every parameter and in x."""
    from crbp_fast import fixed_point

    cell, x, _ = make("batch", 1, conv, shape=(2, 4, 10, 13), k=5)
    grads = []
    for use_linearize in (None, False):
        xx = x.clone().requires_grad_()
        res = fixed_point(cell, xx, steps=6, algorithm=algorithm, adjoint_steps=30, adjoint_tol=0.0,
                          lcp_target=0.5, use_linearize=use_linearize)
        node = type(res.state.grad_fn).__name__
        loss = res.state.square().mean() + (3.0 * res.penalty if res.penalty is not None else 0)
        assert (res.penalty is not None) == (algorithm == "crbp")
        grads.append(torch.autograd.grad(loss, (xx, *cell.parameters())))
        if use_linearize is None:
            assert res.penalty is None or "TrackedStep" in type(res.penalty.grad_fn).__name__, node
    names = ["x"] + [n for n, _ in cell.named_parameters()]
    for name, a, b in zip(names, *grads):
        assert torch.isfinite(a).all(), name
        assert_close(a, b, rtol=1e-10, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tracked_step_backward_runs_only_the_terms_the_loss_uses(monkeypatch, backend):
    """A loss that uses only the state runs the step's VJP, not the penalty's tangent pass on a
    zero weight (autograd would otherwise hand the unused output a zero gradient)."""
    if backend == "torch":
        from crbp_fast.hgru import reference as passes
    elif backend == "native":
        from crbp_fast.hgru.native import tracked as passes
    else:
        from crbp_fast.hgru.triton import tracked as passes

    calls = []
    for name in ("step_vjp", "lcp_tangent"):
        fn = getattr(passes, name)
        monkeypatch.setattr(passes, name, lambda *a, _fn=fn, _name=name, **k: calls.append(_name) or _fn(*a, **k))
    cell, x, h = make("batch", 1, "direct", backend=backend)
    xx = x.clone().requires_grad_()
    out, pen = cell.tracked_step(xx, h, 0.5)
    out.sum().backward(retain_graph=True)
    assert calls == ["step_vjp"]
    pen.backward(retain_graph=True)
    assert calls == ["step_vjp", "lcp_tangent"]
    (out.sum() + pen).backward()
    assert calls == ["step_vjp", "lcp_tangent", "lcp_tangent"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (owed to the GPU run)")
@pytest.mark.parametrize("backend", ["auto", "native"])
@pytest.mark.parametrize("conv", ["direct", "fft"])
def test_tracked_step_on_cuda_matches_autograd(conv, backend, full_float32, monkeypatch):
    """On CUDA (cuFFT, the batched-matmul mix): the explicit node against autograd's route, with
    the Triton plane passes ("auto": the Triton backend) and the native CUDA plane passes (opt-in)."""
    monkeypatch.setenv("CRBP_FAST_CUDA_TRACKED", "1")
    if backend == "native":
        try:
            from crbp_fast.hgru.native import _C
        except ImportError:
            pytest.skip("built without the native extension")
        if not _C.with_cuda():
            pytest.skip("the native extension was built without CUDA")
    cell, x, h = make("batch", 1, conv, dtype=torch.float32, shape=(3, 6, 21, 19), k=7, backend=backend)
    cell, x, h = cell.cuda(), x.cuda(), h.cuda()
    xx = x.clone().requires_grad_()
    out, pen = cell.tracked_step(xx, h, 0.5)
    assert "TrackedStep" in type(pen.grad_fn).__name__
    got = torch.autograd.grad(out.square().mean() + 3 * pen, (xx, *cell.parameters()))
    xr = x.clone().requires_grad_()
    ref_out = cell(xr, h)
    ref_pen = lcp_penalty(cell, xr, h, target=0.5)
    want = torch.autograd.grad(ref_out.square().mean() + 3 * ref_pen, (xr, *cell.parameters()))
    assert_close(pen, ref_pen, rtol=1e-5, name="penalty")
    for name, a, b in zip(["x"] + [n for n, _ in cell.named_parameters()], got, want):
        assert_close(a, b, rtol=2e-4, atol=1e-7, name=name)


# --------------------------------------------------------------------------------------------
# The adjoint's linearisation from the tracked step's factors (HGRUCell.linearization_of)


@pytest.mark.skipif(not _native_built(), reason="built without the native extension (CRBP_FAST_NO_EXT=1)")
@pytest.mark.parametrize("norm, groups", [("batch", 1), ("group", 2), ("none", 1)])
def test_linearization_of_the_tracked_step_is_the_linearization_there(norm, groups):
    """backend="native": the VJP from the tracked step's factors equals cell.linearize(x, h)'s."""
    cell, x, h = make(norm, groups, "fft", backend="native")
    out, _ = cell.tracked_step(x, h.clone().requires_grad_(), 0.5)
    lin, want = cell.linearization_of(out), cell.linearize(x, h)
    assert lin is not None
    assert_close(lin.state, want.state, rtol=1e-13, name="state")
    for _ in range(2):
        v = torch.randn_like(x)
        assert_close(lin.vjp(v), want.vjp(v), rtol=1e-12, name="vjp")


def test_linearization_of_is_none_where_it_does_not_apply():
    cell, x, h = make("batch", 1, "direct", backend="torch")  # the reference's passes: no factors to convert
    out = cell.tracked_step(x, h.clone().requires_grad_())
    assert cell.linearization_of(out) is None
    assert cell.linearization_of(cell(x, h)) is None  # not a tracked step's output
    assert cell.linearization_of(torch.zeros(1)) is None
    if _native_built():
        native_cell, _, _ = make("batch", 1, "direct", backend="native")
        out = native_cell.tracked_step(x, h.clone().requires_grad_())
        out.sum().backward()  # the graph, and the factors with it, are freed
        assert native_cell.linearization_of(out) is None


@pytest.mark.skipif(not _native_built(), reason="built without the native extension (CRBP_FAST_NO_EXT=1)")
def test_linearization_of_refuses_a_parameter_changed_since_the_step():
    cell, x, h = make("batch", 1, "direct", backend="native")
    out = cell.tracked_step(x, h.clone().requires_grad_())
    with torch.no_grad():
        cell.alpha.add_(0.1)  # the factors no longer belong to the cell's parameters
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        cell.linearization_of(out)


@pytest.mark.skipif(not _native_built(), reason="built without the native extension (CRBP_FAST_NO_EXT=1)")
@pytest.mark.parametrize("algorithm", ["rbp", "crbp"])
def test_fixed_point_takes_the_adjoint_linearization_from_the_tracked_step(algorithm, monkeypatch):
    """fixed_point with backend="native" runs no second linearisation, and its gradients equal
    the ones with cell.linearize at the same point."""
    from crbp_fast import fixed_point
    from crbp_fast.hgru import cell as cell_module

    cell, x, _ = make("batch", 1, "fft", shape=(2, 4, 10, 13), k=5, backend="native")

    def gradients():
        xx = x.clone().requires_grad_()
        res = fixed_point(cell, xx, steps=6, algorithm=algorithm, adjoint_steps=30, adjoint_tol=0.0,
                          lcp_target=0.5)
        loss = res.state.square().mean() + (3.0 * res.penalty if res.penalty is not None else 0.0)
        return torch.autograd.grad(loss, (xx, *cell.parameters()))

    calls = []
    linearize = cell_module.HGRUCell.linearize
    monkeypatch.setattr(cell_module.HGRUCell, "linearize",
                        lambda self, *a: calls.append("linearize") or linearize(self, *a))
    reused = gradients()
    assert calls == []
    monkeypatch.setattr(cell_module.HGRUCell, "linearization_of", lambda self, state: None)
    again = gradients()
    assert calls == ["linearize"]
    for name, a, b in zip(["x"] + [n for n, _ in cell.named_parameters()], reused, again):
        assert_close(a, b, rtol=1e-12, name=name)
