"""The FFT convolution engine against the direct one (``F.conv2d``): values, transposed conv,
gradients and double backward, the kernel-spectrum cache, bad inputs, the hGRU cell with
conv="fft", and the conv="auto" choice."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

from crbp_fast import HGRUCell, fixed_point, lcp_penalty
from crbp_fast.conv import engines as conv_engines
from crbp_fast.conv import fft as fft_conv
from crbp_fast.conv.engines import DIRECT, FFT
from crbp_fast.engine.solvers import AdjointDivergenceWarning
from crbp_fast.conv.fft import FFTConv, SpectraScope, fft_shape, kernel_spectrum, kernel_spectrum_adjoint, smooth_size
from crbp_fast.hgru.backends import PassLinearization
from crbp_fast.hgru.reference import conv_same, conv_same_transpose

RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}
DTYPE_IDS = {torch.float32: "f32", torch.float64: "f64"}
C_IN, C_OUT = 5, 4  # unequal, so that a transposed channel mix cannot pass by accident

# (B, H, W, k): k in {1, 3, 5, 9, 15} on 13 x 20 and 31 x 31, B in {1, 3}; k <= H.
CASES = [(b, h, w, k) for h, w in ((13, 20), (31, 31)) for k in (1, 3, 5, 9, 15) if k <= h for b in (1, 3)]
CASE_IDS = [f"B{b}-C{C_IN}-H{h}-W{w}-k{k}" for b, h, w, k in CASES]
DTYPES = [torch.float32, torch.float64]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These shapes are tiny: on a shared 2-core machine a second intra-op thread only adds
    barrier waits (measured 100x slower per op under load), so run them on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (the issue's "relative error")."""
    return float((actual - expected).abs().max() / expected.abs().max())


def randomize(cell: HGRUCell) -> HGRUCell:
    with torch.no_grad():
        for p in cell.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return cell


def cell_pair(c: int, k: int, dtype: torch.dtype) -> tuple[HGRUCell, HGRUCell]:
    """Two cells with the same parameters, conv="direct" and conv="fft"."""
    direct = randomize(HGRUCell(c, k, backend="torch", conv="direct").to(dtype))
    fft = HGRUCell(c, k, backend="torch", conv="fft").to(dtype)
    fft.load_state_dict(direct.state_dict())
    return direct, fft


# --------------------------------------------------------------------------------------------
# FFT sizes


def test_smooth_size():
    assert [smooth_size(n) for n in (1, 11, 13, 17, 157, 164, 1025)] == [1, 12, 14, 18, 160, 168, 1029]
    assert fft_shape(150, 150, 15) == (160, 160)  # H + k // 2 = 157 -> 160
    assert fft_shape(13, 20, 5) == (15, 24)  # odd M and even N both occur


# --------------------------------------------------------------------------------------------
# Values and gradients against the direct conv


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_conv_and_transpose_match_direct(case, dtype):
    b, h, w, k = case
    x = torch.randn(b, C_IN, h, w, dtype=dtype)
    y = torch.randn(b, C_OUT, h, w, dtype=dtype)
    weight = torch.randn(C_OUT, C_IN, k, k, dtype=dtype)
    assert rel_err(FFT.conv(x, weight), conv_same(x, weight)) <= RTOL[dtype]
    assert rel_err(FFT.conv_transpose(y, weight), conv_same_transpose(y, weight)) <= RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradients_match_direct(case, dtype):
    b, h, w, k = case
    for transpose in (False, True):
        c_in, c_out = (C_OUT, C_IN) if transpose else (C_IN, C_OUT)
        x = torch.randn(b, c_in, h, w, dtype=dtype)
        weight = torch.randn(C_OUT, C_IN, k, k, dtype=dtype)
        cot = torch.randn(b, c_out, h, w, dtype=dtype)
        grads = []
        for fn in ((FFT.conv_transpose, conv_same_transpose) if transpose else (FFT.conv, conv_same)):
            xg, wg = x.clone().requires_grad_(), weight.clone().requires_grad_()
            grads.append(torch.autograd.grad(fn(xg, wg), (xg, wg), cot))
        (gx, gw), (rx, rw) = grads
        assert rel_err(gx, rx) <= RTOL[dtype], f"input gradient, transpose={transpose}"
        assert rel_err(gw, rw) <= RTOL[dtype], f"weight gradient, transpose={transpose}"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape, crop", [((18, 12), (13, 11)), ((15, 9), (15, 9)), ((20, 25), (7, 20))])
def test_inverse_transform_fast_path_matches_torch(monkeypatch, shape, crop, dtype):
    """The inverse outside autograd (pocketfft's strided column ifft on CPU) against torch's
    irfft2 cropped, on odd sizes and conj / neg-bit views; whatever records ops (reverse and
    forward mode, a tracer) gets torch's path, and the test counts which path ran."""
    calls = []
    real_scipy = fft_conv._scipy_fft()

    class Counting:
        @staticmethod
        def ifft(*args, **kwargs):
            calls.append(1)
            return real_scipy.ifft(*args, **kwargs)

    monkeypatch.setattr(fft_conv, "_scipy_fft", lambda: Counting)
    m, n = shape
    cdtype = torch.complex64 if dtype == torch.float32 else torch.complex128
    z = torch.randn(3, 2, m, n // 2 + 1, dtype=cdtype)
    want = torch.fft.irfft2(z, s=shape)[..., : crop[0], : crop[1]]
    views = (z, torch.conj(z.conj().resolve_conj()), torch._neg_view(-z), torch._neg_view(torch.conj(-z.conj())),
             z.transpose(0, 1).contiguous().transpose(0, 1))
    for given in views:
        got = fft_conv._inverse(given, shape, *crop)
        assert got.is_contiguous() and got.dtype == dtype
        assert_close(got, want, RTOL[dtype], name="inverse")
    assert len(calls) == len(views), "the plain tensors took the pocketfft path"
    calls.clear()
    tracked = z.clone().requires_grad_(True)
    out = fft_conv._inverse(tracked, shape, *crop)
    assert out.grad_fn is not None, "a tracked input must stay in the graph"
    (g,) = torch.autograd.grad(out.sum(), tracked)
    (g_ref,) = torch.autograd.grad(torch.fft.irfft2(tracked, s=shape)[..., : crop[0], : crop[1]].sum(), tracked)
    assert_close(torch.view_as_real(g), torch.view_as_real(g_ref), RTOL[dtype], name="inverse gradient")
    tangent = torch.randn_like(z)
    with torch.autograd.forward_ad.dual_level():
        dual = fft_conv._inverse(torch.autograd.forward_ad.make_dual(z, tangent), shape, *crop)
        jvp = torch.autograd.forward_ad.unpack_dual(dual).tangent
    assert_close(jvp, torch.fft.irfft2(tangent, s=shape)[..., : crop[0], : crop[1]], RTOL[dtype], name="inverse jvp")
    # A trace must record the transform, not its result as a constant.
    from torch.fx.experimental.proxy_tensor import make_fx

    graph = make_fx(lambda t: fft_conv._inverse(t, shape, *crop))(z)
    other = torch.randn_like(z)
    assert_close(graph(other), torch.fft.irfft2(other, s=shape)[..., : crop[0], : crop[1]], RTOL[dtype], name="traced")
    assert not calls, "autograd, forward mode and tracing must not take the opaque path"
    with torch.no_grad():
        assert_close(fft_conv._inverse(tracked, shape, *crop), want, RTOL[dtype], name="no-grad inverse")
    assert len(calls) == 1, "a tensor that requires grad under no_grad takes the fast path"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", [(1, 13, 20, 5), (3, 31, 31, 15), (2, 9, 16, 9)], ids=lambda c: "B{}-H{}-W{}-k{}".format(*c))
def test_weight_grad_fused_and_autograd_paths_match_direct(monkeypatch, case, dtype):
    """FFTConv.weight_grad outside autograd (the fused outer product) and inside it (the batched
    matmul, differentiable) against the direct weight gradient; the test counts which path ran."""
    from crbp_fast.hgru.reference import conv_same_weight_grad

    b, h, w, k = case
    calls = []
    fused = fft_conv._fused_spectrum_gradient
    monkeypatch.setattr(fft_conv, "_fused_spectrum_gradient", lambda *a: calls.append(1) or fused(*a))
    x = torch.randn(b, C_IN, h, w, dtype=dtype)
    dy = torch.randn(b, C_OUT, h, w, dtype=dtype)
    want = conv_same_weight_grad(x, dy, k)
    got = FFT.weight_grad(x, dy, k)
    assert torch.isfinite(got).all()
    assert_close(got, want, RTOL[dtype], name="fused weight_grad")
    fused_here = fft_conv._mix_kernel(x.device, dtype) is not None  # CRBP_FAST_FFT_MIX=torch: none
    assert len(calls) == int(fused_here), "a plain tensor takes the fused outer product where there is one"
    xt = x.clone().requires_grad_(True)
    tracked = FFT.weight_grad(xt, dy, k)
    assert tracked.grad_fn is not None and len(calls) == int(fused_here), "a tracked input keeps the differentiable path"
    assert_close(tracked.detach(), want, RTOL[dtype], name="tracked weight_grad")
    cot = torch.randn_like(want)
    (g,) = torch.autograd.grad(tracked, xt, cot)
    (g_ref,) = torch.autograd.grad(conv_same_weight_grad(xt, dy, k), xt, cot)
    assert_close(g, g_ref, RTOL[dtype], name="weight_grad's gradient")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_weight_grad_of_pairs_is_that_of_the_concatenation(dtype):
    """weight_grad((x1, x2), (dy1, dy2)) = weight_grad(cat x, cat dy), for both engines, fused
    (plain tensors) and differentiable (a tracked operand); mismatched pairs are refused."""
    from crbp_fast.hgru.reference import conv_same_weight_grad

    k = 5
    x1, x2 = torch.randn(2, C_IN, 11, 14, dtype=dtype), torch.randn(3, C_IN, 11, 14, dtype=dtype)
    g1, g2 = torch.randn(2, C_OUT, 11, 14, dtype=dtype), torch.randn(3, C_OUT, 11, 14, dtype=dtype)
    want = conv_same_weight_grad(torch.cat([x1, x2]), torch.cat([g1, g2]), k)
    for engine in (FFT, DIRECT):
        got = engine.weight_grad((x1, x2), (g1, g2), k)
        assert torch.isfinite(got).all()
        assert_close(got, want, RTOL[dtype], name=f"{engine.name} pairs")
    x1t = x1.clone().requires_grad_(True)
    tracked = FFT.weight_grad((x1t, x2), (g1, g2), k)
    assert tracked.grad_fn is not None
    assert_close(tracked.detach(), want, RTOL[dtype], name="tracked pairs")
    with pytest.raises(ValueError, match="x, dy: expected two tensors or two tuples"):
        FFT.weight_grad((x1, x2), (g1,), k)
    with pytest.raises(ValueError, match=r"dy\[1\]: expected the batch"):
        FFT.weight_grad((x1, x2), (g1, g1), k)
    with pytest.raises(ValueError, match="x, dy: expected two tensors or two tuples"):
        DIRECT.weight_grad((x1, x2), g1, k)
    with pytest.raises(ValueError, match=r"x, dy: expected two tensors or two tuples .* got a tensor of shape"):
        FFT.weight_grad(x1, (g1, g1), k)
    with pytest.raises(TypeError, match="x: expected a torch.Tensor, got NoneType"):
        FFT.weight_grad(None, g1, k)


def test_transform_memo_reuses_only_unchanged_tensors():
    """A TransformMemo keeps the rfft2 of each conv input (outside autograd) for weight_grad:
    hits for the same unchanged tensor, a fresh transform after an in-place write (the version
    counter), none for another tensor; results equal the direct gradient throughout; a dead
    tensor's entry goes with it and close() empties the memo."""
    from crbp_fast.hgru.reference import conv_same_weight_grad

    k = 5
    x = torch.randn(2, C_IN, 12, 13, dtype=torch.float64)
    dy = torch.randn(2, C_OUT, 12, 13, dtype=torch.float64)
    w = torch.randn(C_OUT, C_IN, k, k, dtype=torch.float64)
    memo = fft_conv._TransformMemo()
    with memo:
        FFT.conv(x, w)
        FFT.conv_transpose(dy, w)
        assert len(memo) == 2 and memo.hits == 0
        assert_close(FFT.weight_grad(x, dy, k), conv_same_weight_grad(x, dy, k), RTOL[torch.float64], name="memo")
        assert memo.hits == 2, "both operands' transforms reused"
        x.mul_(-0.5)  # in place: the kept transform is stale
        assert_close(FFT.weight_grad(x, dy, k), conv_same_weight_grad(x, dy, k), RTOL[torch.float64],
                     name="after an in-place write")
        assert memo.hits == 3, "dy reused, x transformed anew"
        other = x.clone()
        assert_close(FFT.weight_grad(other, dy, k), conv_same_weight_grad(other, dy, k), RTOL[torch.float64],
                     name="another tensor")
        before = len(memo)
        del other
        gc.collect()
        assert len(memo) == before - 1, "a dead tensor's transform is dropped"
        # .data = another tensor (no version bump): the stamp's data pointer and shape differ.
        hits = memo.hits
        x.data = torch.randn(3, C_IN, 12, 13, dtype=torch.float64)
        assert FFT.conv(x, w).shape[0] == 3 and memo.hits == hits
        dy3 = torch.randn(3, C_OUT, 12, 13, dtype=torch.float64)
        assert_close(FFT.weight_grad(x, dy3, k), conv_same_weight_grad(x, dy3, k), RTOL[torch.float64],
                     name="after .data =")
        # a tracer records the transform: nothing is taken from or put into the memo
        from torch.fx.experimental.proxy_tensor import make_fx

        kept = len(memo)
        graph = make_fx(lambda t: FFT.conv(t, w))(x)
        other = torch.randn_like(x)
        assert_close(graph(other), conv_same(other, w), RTOL[torch.float64], name="traced under a memo")
        assert len(memo) == kept
    memo.close()
    assert len(memo) == 0
    with torch.enable_grad():  # inside autograd nothing is kept
        with memo:
            FFT.conv(x.clone().requires_grad_(True), w)
        assert len(memo) == 0


@pytest.mark.parametrize("norm", ["batch", "none"])
def test_tracked_step_reuses_every_weight_gradient_transform(monkeypatch, norm):
    """On CPU the tracked step's penalty backward takes all 8 operand transforms of its two
    weight gradients from the memo (4 made in its forward, 4 by its own convs), and its
    gradients equal the autograd route's."""
    hits = []
    original = fft_conv._TransformMemo.get

    def get(self, t, shape, dtype):
        z = original(self, t, shape, dtype)
        hits.append(z is not None)
        return z

    monkeypatch.setattr(fft_conv._TransformMemo, "get", get)
    torch.manual_seed(3)
    cell = HGRUCell(channels=4, kernel_size=5, conv="fft", norm=norm).double()
    x = torch.randn(2, 4, 11, 13, dtype=torch.float64)
    h = torch.rand(2, 4, 11, 13, dtype=torch.float64, requires_grad=True)
    state, penalty = cell.tracked_step(x, h, 0.5)
    hits.clear()
    params = list(cell.parameters())
    got = torch.autograd.grad(state.square().sum() + 3 * penalty, [h, *params])
    assert sum(hits) == 8, f"expected the 8 weight-gradient operands from the memo, got {sum(hits)} of {len(hits)}"
    # lcp_penalty takes J at a detached h; the tracked step also differentiates the penalty in h.
    from crbp_fast.engine.lcp import lcp_from_step

    out = cell(x, h)
    want = torch.autograd.grad(out.square().sum() + 3 * lcp_from_step(out, h, 0.5, create_graph=True), [h, *params])
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, 1e-9, name=f"gradient {i}")


@pytest.mark.parametrize("transpose", [False, True])
def test_traced_conv_records_the_computation(transpose):
    """make_fx of the FFT conv (no autograd) records torch ops, not the native mix kernel's
    output as a constant: the graph run on other inputs gives their conv."""
    from torch.fx.experimental.proxy_tensor import make_fx

    w = torch.randn(C_OUT, C_IN, 5, 5, dtype=torch.float64)
    x = torch.randn(2, C_OUT if transpose else C_IN, 12, 13, dtype=torch.float64)
    run = (lambda t: FFT.conv_transpose(t, w)) if transpose else (lambda t: FFT.conv(t, w))
    ref = conv_same_transpose if transpose else conv_same
    graph = make_fx(run)(x)
    other = torch.randn_like(x)
    assert_close(graph(other), ref(other, w), RTOL[torch.float64], name="traced conv")


def test_150x150_once():
    b, c, k = 1, 3, 15
    x = torch.randn(b, c, 150, 150, requires_grad=True)
    weight = torch.randn(c, c, k, k, requires_grad=True)
    out, ref = FFT.conv(x, weight), conv_same(x, weight)
    assert rel_err(out.detach(), ref.detach()) <= 1e-5
    cot = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad(out, (x, weight), cot), torch.autograd.grad(ref, (x, weight), cot)):
        assert rel_err(a, r) <= 1e-5
    with torch.no_grad():
        assert rel_err(FFT.conv_transpose(cot, weight), conv_same_transpose(cot, weight)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_half_precision_is_computed_in_float32(dtype):
    x = torch.randn(2, C_IN, 13, 20).to(dtype)
    weight = torch.randn(C_OUT, C_IN, 5, 5).to(dtype)
    out = FFT.conv(x, weight)
    assert out.dtype == dtype
    # Against the float32 result on the same (rounded) inputs: only the output rounding remains.
    ref = conv_same(x.float(), weight.float())
    assert rel_err(out.float(), ref) <= 2 * torch.finfo(dtype).eps


def test_autocast_gives_the_autocast_dtype_like_conv2d():
    x, weight = torch.randn(2, C_IN, 13, 20), torch.randn(C_OUT, C_IN, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = FFT.conv(x, weight), conv_same(x, weight)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert rel_err(out.float(), conv_same(x, weight)) <= 2 * torch.finfo(torch.bfloat16).eps


def test_spectrum_cached_under_inference_mode_serves_a_tracked_step():
    engine = FFTConv()
    x, weight = torch.randn(2, 3, 12, 12), torch.nn.Parameter(torch.randn(3, 3, 5, 5))
    with torch.inference_mode():
        engine.conv(x, weight)
    engine.conv(x, weight).sum().backward()
    assert engine.cache_info().misses == 1
    assert_close(weight.grad, torch.autograd.grad(conv_same(x, weight).sum(), weight)[0], rtol=1e-5, name="grad")


@pytest.mark.parametrize("hw", [(5, 6), (6, 5)], ids=["H5-W6-oddN", "H6-W5-evenN"])
def test_gradcheck_and_gradgradcheck(hw):
    """Exact Jacobians for the gradients, random projections (fast mode) for the second order."""
    h, w = hw
    x = torch.randn(1, 2, h, w, dtype=torch.float64, requires_grad=True)
    y = torch.randn(1, 3, h, w, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)

    # gradcheck perturbs the weight in place through .data, behind its version counter: the
    # cache's value check must see every perturbation.
    def conv(a, wt):
        return FFT.conv(a, wt)

    def conv_t(a, wt):
        return FFT.conv_transpose(a, wt)

    assert torch.autograd.gradcheck(conv, (x, weight))
    assert torch.autograd.gradgradcheck(conv, (x, weight), fast_mode=True)
    assert torch.autograd.gradcheck(conv_t, (y, weight))
    assert torch.autograd.gradgradcheck(conv_t, (y, weight), fast_mode=True)


@pytest.mark.parametrize("n", [8, 9], ids=["N8", "N9"])
def test_kernel_spectrum_adjoint(n):
    """<spectrum(w), G> == <w, adjoint(G)> for the [a; b] form (F, 2C, O)."""
    weight = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    grad = torch.randn(7 * (n // 2 + 1), 4, 3, dtype=torch.float64)
    lhs = (kernel_spectrum(weight, (7, n)) * grad).sum()
    rhs = (weight * kernel_spectrum_adjoint(grad, 5, (7, n))).sum()
    assert abs(float(lhs - rhs)) <= 1e-10 * abs(float(lhs))


def test_double_backward_matches_direct():
    """d/dw of a function of d(conv)/dx (create_graph=True), as the LCP penalty needs."""
    x = torch.randn(2, C_IN, 13, 20, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(C_OUT, C_IN, 5, 5, dtype=torch.float64)
    cot = torch.randn(2, C_OUT, 13, 20, dtype=torch.float64, requires_grad=True)
    grads = []
    for fn in (FFT.conv, conv_same):
        wg = weight.clone().requires_grad_()
        (gx,) = torch.autograd.grad(fn(x, wg), x, cot, create_graph=True)
        grads.append(torch.autograd.grad(gx.pow(2).sum(), (wg, cot)))
    for a, r in zip(*grads):
        assert rel_err(a, r) <= 1e-10


# --------------------------------------------------------------------------------------------
# The spectrum cache


def test_cache_reuses_spectra():
    engine = FFTConv()
    x, weight = torch.randn(2, 4, 16, 16), torch.nn.Parameter(torch.randn(4, 4, 5, 5))
    with torch.no_grad():
        for _ in range(3):
            engine.conv(x, weight)
            engine.conv_transpose(x, weight)
    out = engine.conv(x, weight)  # grad mode: the tracked conv reuses the spectrum too
    out.sum().backward()
    assert engine.cache_info() == (6, 1, 1)
    engine.conv(torch.randn(2, 4, 20, 16), weight)  # a new FFT size is a new spectrum
    assert engine.cache_info().misses == 2


def test_cache_is_invalidated_by_optimizer_step_and_inplace_edit():
    engine = FFTConv()
    x, weight = torch.randn(2, 4, 16, 16), torch.nn.Parameter(torch.randn(4, 4, 5, 5))
    before = engine.conv(x, weight)
    before.pow(2).sum().backward()
    torch.optim.SGD([weight], lr=0.1).step()
    with torch.no_grad():
        after = engine.conv(x, weight)
        assert_close(after, conv_same(x, weight), rtol=1e-6, name="after optimizer step")
        assert not torch.allclose(after, before)
        weight.mul_(2)
        assert_close(engine.conv(x, weight), conv_same(x, weight), rtol=1e-6, name="after in-place edit")
        weight.data.mul_(2)  # behind the version counter: the value check sees it
        assert_close(engine.conv(x, weight), conv_same(x, weight), rtol=1e-6, name="after a .data write")
        weight.detach().numpy()[0, 0, 2, 2] += 1.0  # through a numpy view of the same memory
        assert_close(engine.conv(x, weight), conv_same(x, weight), rtol=1e-6, name="after a numpy write")
        assert_close(engine.conv(x, weight), conv_same(x, weight), rtol=1e-6, name="unchanged: reused")
    assert engine.cache_info()[:2] == (1, 5)


def test_cache_does_not_keep_weights_alive():
    engine = FFTConv()
    x = torch.randn(1, 3, 12, 12)
    weight = torch.randn(3, 3, 3, 3)
    engine.conv(x, weight)
    assert engine.cache_info().weights == 1
    del weight
    gc.collect()
    assert engine.cache_info().weights == 0


def _writes_behind_the_version_counter():
    """Ways to change a weight's values that its autograd version counter does not see."""

    def through_data(w):
        w.data.mul_(-1.5)

    def through_numpy(w):
        w.detach().numpy()[:] = (0.01 * torch.randn(w.shape, dtype=w.dtype)).numpy()

    def through_set(w):
        w.data = 0.01 * torch.randn_like(w)

    return [through_data, through_numpy, through_set]


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("write", _writes_behind_the_version_counter(), ids=lambda f: f.__name__)
def test_no_stale_spectra_through_any_public_path(backend, write):
    """The issue's case (C = 25, k = 15, norm "none": 0.31 max error before): after a write the
    version counter misses, every public path of the FFT cell still matches the direct one."""
    torch.manual_seed(0)
    f64 = torch.float64  # a stale spectrum is off by O(1); float64 leaves no doubt about the rest
    direct = randomize(HGRUCell(25, 15, norm="none", backend=backend, conv="direct", dtype=f64))
    fft = HGRUCell(25, 15, norm="none", backend=backend, conv="fft", dtype=f64)
    fft.load_state_dict(direct.state_dict())
    x, h, v = (torch.randn(2, 25, 17, 16, dtype=f64), torch.rand(2, 25, 17, 16, dtype=f64),
               torch.randn(2, 25, 17, 16, dtype=f64))
    with torch.no_grad():
        fft(x, h)  # spectra cached for the old weights
        fixed_point(fft, x, steps=2)
    for name in ("w_gate_inh", "w_gate_exc"):
        write(getattr(fft, name))
        with torch.no_grad():
            getattr(direct, name).copy_(getattr(fft, name))
    with torch.no_grad():
        assert_close(fft(x, h), direct(x, h), rtol=1e-9, name="cell(x, h)")
        assert_close(fft.linearize(x, h).vjp(v), direct.linearize(x, h).vjp(v), rtol=1e-9, name="vjp")
        assert_close(fixed_point(fft, x, steps=3).state, fixed_point(direct, x, steps=3).state, rtol=1e-9,
                     name="fixed_point")
    grads = []
    for cell in (direct, fft):
        # This random cell is not contractive: both engines see the same diverging adjoint and
        # return the same best partial sum (the engine's rule); only their agreement matters here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AdjointDivergenceWarning)
            res = fixed_point(cell, x, steps=3, algorithm="crbp", adjoint_steps=3, adjoint_tol=0, lcp_target=0.0)
            grads.append(torch.autograd.grad((res.state * v).sum() + res.penalty,
                                             [cell.w_gate_inh, cell.w_gate_exc]))
    for a, r in zip(grads[1], grads[0]):
        assert_close(a, r, rtol=1e-9, name="crbp gradient")


def test_fixed_point_pins_spectra_for_its_call_and_drops_them(monkeypatch):
    """One scope per fixed_point call: spectra computed once, served to the forward steps, the
    tracked step, the penalty and the adjoint, closed once the backward is done."""
    from crbp_fast.conv import fft as fft_conv

    scopes = []
    original = fft_conv.SpectraScope.__init__

    def record(self):
        original(self)
        scopes.append(self)

    monkeypatch.setattr(fft_conv.SpectraScope, "__init__", record)
    _, cell = cell_pair(4, 5, torch.float32)
    cell.backend = "native"
    x = torch.randn(2, 4, 16, 19)
    misses = FFT.cache_info().misses
    res = fixed_point(cell, x, steps=4, algorithm="crbp", adjoint_steps=3, adjoint_tol=0, lcp_target=0.0)
    assert len(scopes) == 1 and len(scopes[0]) == 2 and not scopes[0].closed
    assert fft_conv._active_scope() is None
    (res.state.sum() + res.penalty).backward()
    assert FFT.cache_info().misses - misses == 2
    assert scopes[0].closed and len(scopes[0]) == 0
    with torch.no_grad():
        fixed_point(cell, x, steps=2)
    assert scopes[1].closed and fft_conv._active_scope() is None


def test_scope_serves_its_own_spectra_and_nests():
    engine = FFTConv()
    x, weight = torch.randn(1, 3, 12, 12), torch.randn(3, 3, 5, 5)
    outer, inner = SpectraScope(), SpectraScope()
    with outer:
        engine.conv(x, weight)
        with inner:
            engine.conv(x, weight)
            assert len(inner) == 1
        engine.conv(x, weight)
    assert engine.cache_info()[:2] == (2, 1)
    outer.close()
    with pytest.raises(RuntimeError, match="closed"):
        with outer:
            pass


# --------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "x_shape, w_shape, dtypes, error, words",
    [
        ((1, 3, 4, 9), (3, 3, 5, 5), (torch.float32, torch.float32), ValueError, ("weight", "larger", "4 x 9")),
        ((1, 3, 9, 4), (3, 3, 5, 5), (torch.float32, torch.float32), ValueError, ("weight", "larger", "9 x 4")),
        ((1, 3, 9, 9), (3, 3, 3, 3), (torch.complex64, torch.float32), TypeError, ("x:", "complex64")),
        ((1, 3, 9, 9), (3, 3, 3, 3), (torch.float32, torch.int64), TypeError, ("weight:", "int64")),
        ((1, 3, 9, 9), (3, 3, 3, 3), (torch.int32, torch.float32), TypeError, ("x:", "int32")),
        ((1, 2, 9, 9), (3, 3, 3, 3), (torch.float32, torch.float32), ValueError, ("x:", "3 channels")),
        ((1, 3, 9, 9), (3, 3, 4, 4), (torch.float32, torch.float32), ValueError, ("weight:", "odd", "4 x 4")),
        ((3, 9, 9), (3, 3, 3, 3), (torch.float32, torch.float32), ValueError, ("x:", "4-d")),
    ],
    ids=["k-gt-H", "k-gt-W", "complex-x", "int-weight", "int-x", "channels", "even-k", "3d-x"],
)
def test_bad_inputs_raise_naming_the_argument(x_shape, w_shape, dtypes, error, words):
    x, weight = torch.zeros(x_shape, dtype=dtypes[0]), torch.zeros(w_shape, dtype=dtypes[1])
    with pytest.raises(error) as info:
        FFT.conv(x, weight)
    for word in words:
        assert word in str(info.value)


def test_conv_transpose_checks_output_channels():
    with pytest.raises(ValueError, match=r"y: expected 4 channels"):
        FFT.conv_transpose(torch.zeros(1, 5, 9, 9), torch.zeros(4, 5, 3, 3))


# --------------------------------------------------------------------------------------------
# The hGRU cell with conv="fft"


CELL_RTOL = {torch.float32: 1e-4, torch.float64: 1e-10}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_cell_step_and_vjp_match_direct(dtype):
    direct, fft = cell_pair(4, 5, dtype)
    x, h, v = (torch.randn(2, 4, 16, 19, dtype=dtype) for _ in range(3))
    h = h.sigmoid()
    assert_close(fft(x, h), direct(x, h), rtol=RTOL[dtype], name="step")
    assert_close(fft.linearize(x, h).vjp(v), direct.linearize(x, h).vjp(v), rtol=RTOL[dtype], name="vjp")
    # The explicit VJP passes (the fused backends' path) use conv_transpose.
    passes = [PassLinearization(c.params(), x, h, engine).vjp(v) for c, engine in ((fft, FFT), (direct, DIRECT))]
    assert_close(*passes, rtol=RTOL[dtype], name="vjp passes")


@pytest.mark.parametrize("algorithm", ["rbp", "crbp"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_cell_fixed_point_gradients_match_direct(algorithm, dtype):
    direct, fft = cell_pair(4, 5, dtype)
    x0, v = torch.randn(2, 4, 16, 19, dtype=dtype), torch.randn(2, 4, 16, 19, dtype=dtype)
    grads = []
    for cell in (direct, fft):
        x = x0.clone().requires_grad_()
        # lcp_target=0 makes the penalty non-zero, so that its double backward is exercised.
        res = fixed_point(cell, x, steps=6, algorithm=algorithm, adjoint_steps=6, adjoint_tol=0, lcp_target=0.0)
        loss = (res.state * v).sum() + (10 * res.penalty if res.penalty is not None else 0)
        loss.backward()
        grads.append({"x": x.grad, **{n: p.grad for n, p in cell.named_parameters()}})
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], rtol=CELL_RTOL[dtype], name=name)


def test_lcp_penalty_gradients_match_direct():
    direct, fft = cell_pair(4, 5, torch.float64)
    x, h = torch.randn(2, 4, 16, 19, dtype=torch.float64), torch.rand(2, 4, 16, 19, dtype=torch.float64)
    grads = []
    for cell in (direct, fft):
        params = list(cell.parameters())
        grads.append(torch.autograd.grad(lcp_penalty(cell, x, h, target=0.0), params))
    for (name, _), a, r in zip(direct.named_parameters(), grads[1], grads[0]):
        assert_close(a, r, rtol=1e-10, name=name)


def test_training_iteration_computes_each_spectrum_once():
    """N no-grad steps, the tracked step, the LCP double backward and the adjoint loop: 2 spectra."""
    _, cell = cell_pair(4, 5, torch.float32)
    x = torch.randn(2, 4, 16, 19)
    misses = FFT.cache_info().misses
    res = fixed_point(cell, x, steps=8, algorithm="crbp", adjoint_steps=5, adjoint_tol=0, lcp_target=0.0)
    (res.state.sum() + res.penalty).backward()
    assert FFT.cache_info().misses - misses == 2
    torch.optim.SGD(cell.parameters(), lr=0.01).step()
    with torch.no_grad():
        cell(x)
    assert FFT.cache_info().misses - misses == 4


# --------------------------------------------------------------------------------------------
# conv="auto"


def test_resolve_explicit_names_and_env_override(monkeypatch):
    x = torch.zeros(1, 3, 20, 20)
    monkeypatch.setenv(conv_engines.ENV_VAR, "fft")
    assert conv_engines.resolve_conv("direct", x, 5) is DIRECT  # an explicit name wins
    assert conv_engines.resolve_conv("auto", x, 5) is FFT
    assert conv_engines.resolve_conv("auto", x, 25) is DIRECT  # fft does not apply: k > H
    monkeypatch.setenv(conv_engines.ENV_VAR, "direct")
    assert conv_engines.resolve_conv("auto", x, 15) is DIRECT
    assert conv_engines.resolve_conv("fft", x, 15) is FFT
    monkeypatch.setenv(conv_engines.ENV_VAR, "cudnn")
    with pytest.raises(ValueError, match="CRBP_FAST_CONV"):
        conv_engines.resolve_conv("auto", x, 5)
    with pytest.raises(ValueError, match="conv: expected one of"):
        conv_engines.resolve_conv("winograd", x, 5)


def test_auto_measures_once_per_shape_and_keeps_rng(monkeypatch):
    monkeypatch.delenv(conv_engines.ENV_VAR, raising=False)
    monkeypatch.setattr(conv_engines, "_choices", {})
    monkeypatch.setattr(conv_engines, "MODEL_MARGIN", float("inf"))  # always inside the margin
    calls = []
    real_measure = conv_engines._measure
    monkeypatch.setattr(conv_engines, "_measure", lambda *a: calls.append(a) or real_measure(*a))
    x = torch.zeros(1, 3, 16, 16)
    rng = torch.get_rng_state()
    first = conv_engines.resolve_conv("auto", x, 3)
    assert torch.equal(rng, torch.get_rng_state())
    assert conv_engines.resolve_conv("auto", x, 3) is first and len(calls) == 1
    choice = conv_engines.auto_choices()[(x.device, x.dtype, 1, 3, 16, 16, 3)]
    assert choice.measured_direct_s is not None and choice.measured_fft_s is not None
    conv_engines.resolve_conv("auto", x, 1)  # k = 1 and k > H need no measurement
    conv_engines.resolve_conv("auto", x, 17)
    assert len(calls) == 1


@pytest.mark.parametrize(
    "measured, expected",
    [({"direct": 2e-3, "fft": 1e-3}, "fft"), ({"direct": 1e-3, "fft": 3e-3}, "direct"),
     ({"direct": 1.1e-3, "fft": 1e-3}, "model")],
    ids=["fft-2x-faster", "direct-3x-faster", "within-20pc"],
)
def test_auto_inside_the_margin_follows_a_clear_measurement(monkeypatch, measured, expected):
    monkeypatch.delenv(conv_engines.ENV_VAR, raising=False)
    monkeypatch.setattr(conv_engines, "_choices", {})
    monkeypatch.setattr(conv_engines, "MODEL_MARGIN", float("inf"))
    monkeypatch.setattr(conv_engines, "_measure", lambda x, k, predicted: measured)
    x = torch.zeros(1, 3, 16, 16)
    p_direct, p_fft = conv_engines.predict_times("cpu", x.dtype, tuple(x.shape), 3)
    model = "fft" if p_fft < p_direct else "direct"
    assert conv_engines.resolve_conv("auto", x, 3).name == (model if expected == "model" else expected)


def test_auto_outside_the_margin_never_measures(monkeypatch):
    """The issue's case: B4-C25-64x64-k15, where a probe under load once picked direct and fft
    is 5x faster. The model decides it without timing anything, so the pick cannot flip."""
    monkeypatch.delenv(conv_engines.ENV_VAR, raising=False)
    monkeypatch.setattr(conv_engines, "_choices", {})
    monkeypatch.setattr(conv_engines, "_measure", lambda *a: pytest.fail("measured outside the margin"))
    probe = torch.zeros(1).expand(4, 25, 64, 64)
    assert conv_engines.resolve_conv("auto", probe, 15) is FFT
    assert conv_engines.auto_choices()[(probe.device, probe.dtype, 4, 25, 64, 64, 15)].reason.startswith("cost model")
    probe = torch.zeros(1).expand(1, 4, 16, 16)
    assert conv_engines.resolve_conv("auto", probe, 3) is DIRECT


def test_measurement_skips_an_engine_over_budget():
    x = torch.zeros(1, 3, 16, 16)
    measured = conv_engines._measure(x, 5, {"direct": 10 * conv_engines.MEASURE_BUDGET_S, "fft": 1e-4})
    assert set(measured) == {"fft"}


def test_cost_model_prefers_fft_at_the_paper_shape_and_direct_for_tiny_kernels():
    for batch in (2, 4, 32):
        direct, fft = conv_engines.predict_times("cpu", torch.float32, (batch, 25, 150, 150), 15)
        assert fft * conv_engines.MODEL_MARGIN < direct
    direct, fft = conv_engines.predict_times("cpu", torch.float32, (4, 25, 150, 150), 3)
    assert direct < fft


def test_cell_with_auto_conv_matches_direct():
    direct = randomize(HGRUCell(3, 3, backend="torch", conv="direct"))
    auto = HGRUCell(3, 3, backend="torch", conv="auto")
    auto.load_state_dict(direct.state_dict())
    x, h = torch.randn(2, 3, 12, 12), torch.rand(2, 3, 12, 12)
    assert_close(auto(x, h), direct(x, h), rtol=1e-5, name="step")


def test_fft_engine_matches_f_conv2d_padding_convention():
    """The contract, stated once without the reference module: F.conv2d(x, w, padding=k // 2)."""
    x, weight = torch.randn(2, 3, 11, 14, dtype=torch.float64), torch.randn(2, 3, 7, 7, dtype=torch.float64)
    assert rel_err(FFT.conv(x, weight), F.conv2d(x, weight, padding=3)) <= 1e-12
