"""The FFT conv's fused channel mix and spectrum gradient (spectral_mix, spectral_outer): the
native (C++) and Triton kernels against the plain-torch reference passes of crbp_fast.conv.fft,
on odd sizes (frequencies not a multiple of the 32-lane tile, batches past the kernels' batch
block), NaN-poisoned outputs (conftest's torch.empty; CRBP_FAST_DEBUG_NAN_FILL=1 for the
extension) and a hard fail on NaN; then the FFT engine with each mix kernel against F.conv2d
(forward, both gradients, double backward), and a whole crbp iteration in float64 against the
reference (backend="torch", conv="direct")."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import CPU_ISAS, assert_close, cpu_isa, cpu_runs

from crbp_fast import HGRUCell, fixed_point
from crbp_fast.conv import fft as fft_conv
from crbp_fast.conv.fft import FFTConv, MIX_LANES, mix_layout, mix_layout_inverse, spectral_mix, spectral_outer

try:
    from crbp_fast.hgru.native import hgru as native
except ImportError as err:
    if os.environ.get("CRBP_FAST_NO_EXT") == "1":
        native = None
    else:
        raise

try:
    from crbp_fast.hgru.triton import hgru as triton_hgru
except ImportError:
    triton_hgru = None

TRITON = pytest.param("triton", marks=pytest.mark.skipif(
    triton_hgru is None or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs triton (a GPU or the interpreter)"))
# The kernels themselves: the native ones once per CPU instruction set (each ISA's object is its
# own compiled code), then Triton.
KERNELS = [
    pytest.param(f"native-{isa}", marks=pytest.mark.skipif(
        native is None or not cpu_runs(isa), reason=f"needs the native extension and a CPU that runs {isa}"))
    for isa in CPU_ISAS
] + [TRITON]
DEV = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
RTOL = {torch.float32: 3e-6, torch.float64: 1e-13}
# (B, O, C, M, Nh): P = M * Nh frequencies; 9 samples pass the CPU kernels' batch block of 8.
SIZES = [(3, 5, 7, 7, 5), (1, 4, 4, 8, 4), (9, 3, 2, 5, 13), (2, 1, 6, 3, 3)]


# conftest's fixture for every test here: NaN-filled extension outputs.
pytestmark = pytest.mark.usefixtures("nan_filled_outputs")


@contextlib.contextmanager
def _impl(name: str):
    """(spectral_mix, spectral_outer) of kernel `name` ('native-<isa>' or 'triton')."""
    if name.startswith("native-"):
        with cpu_isa(name.removeprefix("native-")):
            yield native.spectral_mix, native.spectral_outer
    else:
        yield triton_hgru.spectral_mix, triton_hgru.spectral_outer


def _random_spectrum(o, c, m, nh, dtype):
    real = torch.float32 if dtype == torch.complex64 else torch.float64
    return torch.randn(m * nh, 2 * c, o, dtype=real, device=DEV)


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("dtype", (torch.complex64, torch.complex128))
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "B{}-O{}-C{}-M{}-Nh{}".format(*s))
@pytest.mark.parametrize("transpose", (False, True))
def test_spectral_mix_matches_reference(name, dtype, size, transpose):
    b, o, c, m, nh = size
    spec = _random_spectrum(o, c, m, nh, dtype)
    layout = mix_layout(spec, (m, 2 * (nh - 1)))
    z = torch.randn(b, o if transpose else c, m * nh, dtype=dtype, device=DEV)
    with _impl(name) as (mix, _):
        got = torch.view_as_complex(mix(torch.view_as_real(z), layout, transpose))
    want = spectral_mix(z, layout, transpose)
    real = torch.float32 if dtype == torch.complex64 else torch.float64
    assert_close(torch.view_as_real(got), torch.view_as_real(want), RTOL[real], name=f"{name} mix")
    # The reference pass is the mix the batched-matmul path computes (S's own layout).
    k = torch.view_as_complex(spec.reshape(nh, m, 2, c, o).permute(4, 3, 1, 0, 2).contiguous()).reshape(o, c, -1)
    ref = torch.einsum("ocp,bop->bcp", k.conj(), z) if transpose else torch.einsum("ocp,bcp->bop", k, z)
    assert_close(torch.view_as_real(want), torch.view_as_real(ref), RTOL[real], name="reference mix")


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("dtype", (torch.complex64, torch.complex128))
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "B{}-O{}-C{}-M{}-Nh{}".format(*s))
def test_spectral_outer_matches_reference(name, dtype, size):
    b, o, c, m, nh = size
    p = torch.randn(b, o, m * nh, dtype=dtype, device=DEV)
    q = torch.randn(b, c, m * nh, dtype=dtype, device=DEV)
    with _impl(name) as (_, outer):
        got = outer(torch.view_as_real(p), torch.view_as_real(q), m)
    want = spectral_outer(p, q, m)
    real = torch.float32 if dtype == torch.complex64 else torch.float64
    assert got.shape == (m * nh, 2 * c, o)
    assert_close(got, want, RTOL[real], name=f"{name} outer")
    # Into a NaN-poisoned out buffer: every element written, the buffer itself returned.
    out = torch.full_like(got, float("nan"))
    with _impl(name) as (_, outer):
        again = outer(torch.view_as_real(p), torch.view_as_real(q), m, out)
    assert again.data_ptr() == out.data_ptr()
    assert_close(out, want, RTOL[real], name=f"{name} outer into out")


@pytest.mark.parametrize("name", KERNELS)
def test_spectral_outer_rejects_bad_out(name):
    p = torch.randn(2, 3, 40, 2, device=DEV)
    q = torch.randn(2, 4, 40, 2, device=DEV)
    error = RuntimeError if name.startswith("native-") else ValueError
    with _impl(name) as (_, outer):
        with pytest.raises(error, match=r"out: expected .*\(40, 8, 3\)"):
            outer(p, q, 8, torch.empty(40, 3, 8, device=DEV))
        with pytest.raises(error, match="out: expected"):
            outer(p, q, 8, torch.empty(40, 8, 3, dtype=torch.float64, device=DEV))
        with pytest.raises(error, match="out: expected a contiguous"):
            outer(p, q, 8, torch.empty(3, 8, 40, device=DEV).permute(2, 1, 0))
        with pytest.raises(error, match="out: must not overlap"):
            big = torch.empty(2 * 4 * 40 * 2 + 40 * 8 * 3, device=DEV)
            qq = big[: q.numel()].view_as(q)
            outer(p, qq, 8, big[q.numel() - 1:][: 40 * 8 * 3].view(40, 8, 3))


@pytest.mark.skipif(native is None, reason="built with CRBP_FAST_NO_EXT=1")
def test_native_outputs_on_huge_pages_are_exact():
    # Outputs of 4 MiB and more get transparent huge pages on Linux (csrc/ops.cpp alloc_output):
    # the madvise'd interior and the unaligned ends of a 9.4 MB spectrum gradient and of a 4.7 MB
    # mix are all written (NaN-poisoned first by the fixture), and equal the reference.
    b, o, c, m, nh = 2, 16, 16, 96, 49
    p = torch.randn(b, o, m * nh, dtype=torch.complex64)
    q = torch.randn(b, c, m * nh, dtype=torch.complex64)
    got = native.spectral_outer(torch.view_as_real(p), torch.view_as_real(q), m)
    assert got.nbytes >= 4 << 20
    assert_close(got, spectral_outer(p, q, m), RTOL[torch.float32], name="native outer, huge pages")
    spec = _random_spectrum(o, c, m, nh, torch.complex64)
    layout = mix_layout(spec, (m, 2 * (nh - 1)))
    z = torch.randn(4 * b, c, m * nh, dtype=torch.complex64)
    mixed = native.spectral_mix(torch.view_as_real(z), layout, False)
    assert mixed.nbytes >= 4 << 20
    assert_close(mixed, torch.view_as_real(spectral_mix(z, layout, False)), RTOL[torch.float32],
                 name="native mix, huge pages")


def test_mix_layout_roundtrip_and_padding():
    spec = torch.randn(7 * 5, 2 * 3, 4, dtype=torch.float64)
    layout = mix_layout(spec, (7, 8))
    assert layout.shape == (-(-35 // MIX_LANES), 4, 3, 2, MIX_LANES)
    assert torch.equal(mix_layout_inverse(layout, (7, 8)), spec)
    tail = layout.permute(0, 4, 1, 2, 3).reshape(-1, 4, 3, 2)[35:]
    assert torch.equal(tail, torch.zeros_like(tail))
    with pytest.raises(ValueError, match="spectrum: expected shape"):
        mix_layout(spec, (6, 8))


@pytest.mark.skipif(native is None, reason="built with CRBP_FAST_NO_EXT=1")
def test_native_mix_rejects_bad_input():
    from crbp_fast.hgru.native import _C

    z = torch.randn(2, 3, 40, 2)
    layout = torch.randn(2, 4, 3, 2, MIX_LANES)
    with pytest.raises(RuntimeError, match=r"z: expected a \(B, X, P, 2\)"):
        _C.spectral_mix(torch.randn(2, 3, 40), layout, False)
    with pytest.raises(RuntimeError, match="spec: expected shape"):
        _C.spectral_mix(z, torch.randn(3, 4, 3, 2, MIX_LANES), False)
    with pytest.raises(RuntimeError, match="z: expected 4 channels"):
        _C.spectral_mix(z, layout, True)
    with pytest.raises(RuntimeError, match="spec: expected the dtype"):
        _C.spectral_mix(z, layout.double(), False)
    with pytest.raises(RuntimeError, match="out: must not overlap"):
        _C.spectral_mix(z, torch.randn(2, 3, 3, 2, MIX_LANES), False, out=z)
    with pytest.raises(RuntimeError, match="rows: expected a positive divisor"):
        _C.spectral_outer(z, z, 7)
    with pytest.raises(RuntimeError, match="q: expected the batch"):
        _C.spectral_outer(z, torch.randn(1, 3, 40, 2), 8)
    # a NaN-poisoned out buffer is overwritten everywhere
    out = torch.full((2, 4, 40, 2), float("nan"))
    _C.spectral_mix(z, layout, False, out=out)
    assert torch.isfinite(out).all()


def test_mix_env_var_is_checked(monkeypatch):
    monkeypatch.setenv(fft_conv.MIX_ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="CRBP_FAST_FFT_MIX: expected one of"):
        FFTConv().conv(torch.randn(1, 2, 9, 9), torch.randn(2, 2, 3, 3))


# The FFT engine's mix choices (CRBP_FAST_FFT_MIX): native runs the default instruction set.
MIXES = ["torch", pytest.param("native", marks=pytest.mark.skipif(native is None, reason="built with CRBP_FAST_NO_EXT=1")),
         TRITON]


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_fft_engine_with_each_mix_matches_direct(monkeypatch, mix, dtype):
    monkeypatch.setenv(fft_conv.MIX_ENV_VAR, mix)
    engine = FFTConv()
    x = torch.randn(3, 5, 13, 11, dtype=dtype, device=DEV, requires_grad=True)
    w = torch.randn(4, 5, 5, 5, dtype=dtype, device=DEV, requires_grad=True)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    y, ref = engine.conv(x, w), F.conv2d(x, w, padding=2)
    assert_close(y, ref, rtol, name="conv")
    g = torch.randn_like(y)
    for got, want, name in zip(torch.autograd.grad(y, (x, w), g), torch.autograd.grad(ref, (x, w), g), ("dx", "dw")):
        assert_close(got, want, rtol, name=name)
    # the adjoint conv and its weight gradient
    yt = engine.conv_transpose(g.requires_grad_(True), w)
    reft = torch.nn.grad.conv2d_input(x.shape, w, g, padding=2)
    assert_close(yt, reft, rtol, name="conv_transpose")
    gt = torch.randn_like(yt)
    got = torch.autograd.grad(yt, (g, w), gt)
    want = torch.autograd.grad(reft, (g, w), gt)
    for a, e, name in zip(got, want, ("dy", "dw (transpose)")):
        assert_close(a, e, rtol, name=name)


@pytest.mark.parametrize("mix", MIXES)
def test_fft_engine_double_backward_with_each_mix(monkeypatch, mix):
    monkeypatch.setenv(fft_conv.MIX_ENV_VAR, mix)
    engine = FFTConv()
    x = torch.randn(2, 3, 9, 10, dtype=torch.float64, device=DEV, requires_grad=True)
    w = torch.randn(3, 3, 3, 3, dtype=torch.float64, device=DEV, requires_grad=True)

    def second(conv):
        out = conv(x, w)
        (gx,) = torch.autograd.grad(out.sin().sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (x, w))

    got = second(engine.conv)
    want = second(lambda a, b: F.conv2d(a, b, padding=1))
    for a, e in zip(got, want):
        assert_close(a, e, 1e-11)


@pytest.mark.skipif(native is None, reason="built with CRBP_FAST_NO_EXT=1")
@pytest.mark.parametrize("algorithm", ("crbp", "rbp"))
def test_crbp_iteration_gradients_native_fused_mix_float64(monkeypatch, algorithm):
    """Every parameter's and x's gradient of a whole iteration (loss + 10 x penalty) with the
    defaults' engines (native backend, FFT conv, native fused mix) against the reference."""
    monkeypatch.setenv(fft_conv.MIX_ENV_VAR, "native")
    grads = {}
    for backend, conv in (("native", "fft"), ("torch", "direct")):
        torch.manual_seed(3)
        cell = HGRUCell(5, 5, backend=backend, conv=conv).double()
        torch.manual_seed(4)
        x = torch.randn(2, 5, 11, 9, dtype=torch.float64).square().requires_grad_(True)
        res = fixed_point(cell, x, steps=4, algorithm=algorithm, adjoint_steps=3, adjoint_tol=0.0,
                          use_linearize=backend != "torch")
        loss = res.state.square().mean() + (10 * res.penalty if res.penalty is not None else 0)
        loss.backward()
        grads[backend] = {"x": x.grad, **{n: p.grad for n, p in cell.named_parameters()}}
    for name, want in grads["torch"].items():
        assert_close(grads["native"][name], want, 1e-9, name=name)


@pytest.mark.skipif(native is None, reason="built with CRBP_FAST_NO_EXT=1")
def test_native_out_buffers_get_a_new_version():
    """A buffer a native kernel writes in place gets a new version counter, as an in-place torch
    op would give it: autograd refuses a saved tensor that was overwritten, and the FFT engine's
    transform memo does not reuse a stale transform of it."""
    from crbp_fast.hgru.native import _C

    p = torch.randn(2, 3, 40, 2)
    q = torch.randn(2, 4, 40, 2)
    out = torch.empty(40, 8, 3)
    before = out._version
    _C.spectral_outer(p, q, 8, out=out)
    assert out._version > before
    z = torch.randn(2, 3, 40, 2)
    mixed = torch.empty(2, 4, 40, 2)
    before = mixed._version
    _C.spectral_mix(z, torch.randn(2, 4, 3, 2, MIX_LANES), False, out=mixed)
    assert mixed._version > before
    dy = torch.randn(2, 3, 5, 6)
    before = dy._version
    _C.norm_vjp(dy, torch.randn(2, 3, 5, 6), torch.rand(2, 3) + 0.5, "batch", torch.randn(3), 1, out=dy)
    assert dy._version > before, "a map written in place (out=dy) by a pass"
    # the kind of defect: a saved tensor overwritten by a kernel is refused by autograd
    a = torch.randn(40, 8, 3, requires_grad=True)
    saved = a * 1.0
    y = saved.sin()
    _C.spectral_outer(p, q, 8, out=saved.detach())
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
