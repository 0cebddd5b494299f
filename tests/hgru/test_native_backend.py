"""The native extension (backend="native") against the reference: each pass, the step,
linearize / vjp, the engine's gradients, input validation and the fallback without the extension.

Every output the extension allocates is filled with NaN before its kernel runs
(CRBP_FAST_DEBUG_NAN_FILL=1, set by the autouse fixture below), so an element a kernel does not
write fails ``assert_close``. Shapes are odd (13 x 11 leaves a partial pixel tile; C = 5 leaves a
partial block of the 1x1 gates); tests marked ``gpu`` need CUDA and a CUDA build.
"""

from __future__ import annotations

import logging
import sys

import pytest
import torch

import backend_cases
from backend_cases import reference_vjp
from conftest import CPU_ISAS, assert_close, cpu_isa, cpu_runs

from crbp_fast import HGRUCell, fixed_point
from crbp_fast.conv import engines as conv_engines
from crbp_fast.conv.engines import DIRECT
from crbp_fast.hgru import backends, reference

try:
    from crbp_fast.hgru.native import _C
    from crbp_fast.hgru.native import hgru as native
except ImportError as err:  # a missing build fails here, unless it was asked for
    import os

    if os.environ.get("CRBP_FAST_NO_EXT") == "1":
        pytest.skip(f"built without the native extension (CRBP_FAST_NO_EXT=1): {err}", allow_module_level=True)
    raise

NORMS = ("batch", "group", "none")
DTYPES = (torch.float32, torch.float64)
CPU = torch.device("cpu")
RTOL = {torch.float32: 2e-5, torch.float64: 1e-12}
SMALL = (3, 5, 13, 11)
gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and _C.with_cuda()),
    reason="needs a CUDA device and a CUDA build of crbp_fast.hgru.native",
)


# conftest's fixture for every test here: NaN-filled extension outputs.
pytestmark = pytest.mark.usefixtures("nan_filled_outputs")


def make_problem(shape, k, norm, *, dtype=torch.float64, device=CPU, backend="native", conv="direct"):
    return backend_cases.make_problem(shape, k, norm, backend=backend, dtype=dtype, device=device, conv=conv)


def check_step_and_vjp(cell, x, h, rtol, engine=DIRECT):
    backend_cases.check_step_and_vjp("native", native.NativeLinearization, cell, x, h, rtol, engine)


# --------------------------------------------------------------------------------------------
# Each pass against its reference


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", NORMS)
def test_forward_passes_match_reference(norm, dtype):
    cell, x, h = make_problem(SMALL, 3, norm, dtype=dtype)
    p, rtol = cell.params(), RTOL[dtype]
    c1, c2 = torch.randn_like(x), torch.randn_like(x)
    assert_close(native.gate_inh(h, p.u1_weight, p.u1_bias), reference.gate_inh(h, p.u1_weight, p.u1_bias), rtol)
    args = (p.norm_inh, p.alpha, p.mu, p.u2_weight, p.u2_bias)
    for got, want, name in zip(native.inhibit(c1, x, h, *args), reference.inhibit(c1, x, h, *args), ("h1", "g2")):
        assert_close(got, want, rtol, name=name)
    h1, g2 = reference.inhibit(c1, x, h, *args)
    args = (h, h1, g2, p.norm_exc, p.kappa, p.gamma, p.omega)
    assert_close(native.excite_mix(c2, *args), reference.excite_mix(c2, *args), rtol, name="excite_mix")
    assert_close(native.normalize(c1, p.norm_inh), reference.normalize(c1, p.norm_inh), rtol, name="normalize")
    if norm != "none":
        for got, want in zip(native.norm_stats(c1, p.norm_inh), reference.norm_stats(c1, p.norm_inh)):
            assert got.shape == want.shape
            assert_close(got, want, rtol, name="norm_stats")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", NORMS)
def test_vjp_passes_match_reference(norm, dtype):
    cell, x, h = make_problem(SMALL, 3, norm, dtype=dtype)
    p, rtol = cell.params(), RTOL[dtype]
    with torch.no_grad():
        ref, nat = reference.linearize(x, h, p), native.linearize(x, h, p)
    v = torch.randn_like(x)
    got, want = native.vjp_excite_mix(v, nat, p.u2_weight), reference.vjp_excite_mix(v, ref, p.u2_weight)
    for g, w, name in zip(got, want, ("dc2", "dh1", "dh")):
        assert_close(g, w, rtol, name=name)
    dh1, dh, extra = torch.randn_like(x), torch.randn_like(x), torch.randn_like(x)
    got = native.vjp_inhibit(dh1, dh, nat, dh1_extra=extra)
    for g, w, name in zip(got, reference.vjp_inhibit(dh1 + extra, dh, ref), ("dc1", "dh")):
        assert_close(g, w, rtol, name=name)
    got = native.vjp_gate_inh(dh1, dh, nat, p.u1_weight)
    assert_close(got, reference.vjp_gate_inh(dh1, dh, ref, p.u1_weight), rtol, name="vjp_gate_inh")
    if norm != "none":
        got = native.norm_vjp(v, nat.xhat1, nat.invstd1, p.norm_inh)
        assert_close(got, reference.norm_vjp(v, ref.xhat1, ref.invstd1, p.norm_inh), rtol, name="norm_vjp")
        assert_close(nat.xhat2, ref.xhat2, rtol, name="xhat2")


@pytest.mark.parametrize("channels", [1, 3, 8])
def test_gates_with_any_channel_count(channels):
    """The 1x1 gates' register blocks take 4 channels: fewer, and a multiple of 4."""
    cell, x, h = make_problem((2, channels, 9, 7), 3, "batch")
    check_step_and_vjp(cell, x, h, RTOL[torch.float64])


# --------------------------------------------------------------------------------------------
# The backend: step, linearize, vjp


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [3, 5], ids=lambda k: f"k{k}")
@pytest.mark.parametrize("norm", NORMS)
def test_step_and_vjp_match_autograd(norm, k, dtype, threads):
    cell, x, h = make_problem(SMALL, k, norm, dtype=dtype)
    check_step_and_vjp(cell, x, h, RTOL[dtype])


def test_planes_larger_than_a_work_chunk():
    """H x W above the kernels' per-plane chunk sizes: statistics merged across chunks."""
    shape = (2, 3, 131, 129)
    cell, x, h = make_problem(shape, 3, "batch")
    check_step_and_vjp(cell, x, h, RTOL[torch.float64])


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_each_cpu_instruction_set(isa):
    if not cpu_runs(isa):
        pytest.skip(f"this CPU does not run the {isa} kernels")
    with cpu_isa(isa):
        assert _C.cpu_isa() == isa
        for dtype in DTYPES:
            cell, x, h = make_problem(SMALL, 3, "group", dtype=dtype)
            check_step_and_vjp(cell, x, h, RTOL[dtype])


def test_unknown_cpu_instruction_set_is_refused():
    with pytest.raises(RuntimeError, match="expected 'base', 'avx2' or 'avx512', got 'sse9'"):
        _C.set_cpu_isa("sse9")


def test_non_contiguous_inputs():
    cell, x, h = make_problem((3, 5, 11, 13), 3, "batch")
    x_nc, h_nc = x.transpose(2, 3).contiguous().transpose(2, 3), h.to(memory_format=torch.channels_last)
    assert not x_nc.is_contiguous() and not h_nc.is_contiguous()
    check_step_and_vjp(cell, x_nc, h_nc, RTOL[torch.float64])
    with torch.no_grad():
        assert_close(cell(x_nc, h_nc), reference.step(x, h, cell.params()), RTOL[torch.float64], name="cell")
    p = cell.params()
    assert_close(native.gate_inh(h_nc, p.u1_weight, p.u1_bias), reference.gate_inh(h, p.u1_weight, p.u1_bias), 1e-12)


def test_conv_engine_fft():
    cell, x, h = make_problem((2, 5, 17, 15), 5, "batch")
    engine = conv_engines.resolve_conv("fft", x, 5)
    check_step_and_vjp(cell, x, h, 1e-10, engine=engine)


def test_tracked_step_is_the_differentiable_reference():
    """With gradients needed the step is autograd's (and carries the LCP's double backward);
    without, it is the fused one and holds no graph."""
    cell, x, h = make_problem(SMALL, 3, "batch")
    out = cell(x, h)
    assert out.grad_fn is not None
    (g,) = torch.autograd.grad(out.sum(), cell.alpha, create_graph=True)
    assert g.grad_fn is not None
    with torch.no_grad():
        assert cell(x, h).grad_fn is None
    cell.requires_grad_(False)
    assert cell(x, h).grad_fn is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_engine_gradients_equal_torch_backend(dtype):
    shape, k = (2, 5, 12, 10), 3
    cell, x, _ = make_problem(shape, k, "batch", dtype=dtype, backend="native")
    ref_cell = HGRUCell(5, k, backend="torch", conv="direct", dtype=dtype)
    ref_cell.load_state_dict(cell.state_dict())
    target = torch.randn(shape, dtype=dtype)
    grads = []
    for c in (cell, ref_cell):
        xx = x.clone().requires_grad_(True)
        res = fixed_point(c, xx, steps=6, algorithm="crbp", adjoint_steps=8, adjoint_tol=0)
        loss = (res.state * target).sum() + res.penalty
        loss.backward()
        grads.append({"x": xx.grad, **{n: prm.grad for n, prm in c.named_parameters()}})
    rtol = 1e-4 if dtype == torch.float32 else 1e-10
    for name, g in grads[0].items():
        assert_close(g, grads[1][name], rtol, name=name)


# --------------------------------------------------------------------------------------------
# Validation and the extension's absence


def test_bindings_validate_their_inputs():
    cell, x, h = make_problem(SMALL, 3, "group", dtype=torch.float32)
    pp = native._prepare(cell.params(), x)
    with pytest.raises(RuntimeError, match="h: expected a contiguous tensor"):
        _C.gate_inh(h.transpose(2, 3), pp.u1_weight, pp.u1_bias)
    with pytest.raises(RuntimeError, match="CPU kernels take float32 or float64"):
        _C.gate_inh(h.half(), pp.u1_weight, pp.u1_bias)
    with pytest.raises(RuntimeError, match=r"u1_weight: expected shape \[5, 5\]"):
        _C.gate_inh(h, pp.u1_weight[:4], pp.u1_bias)
    with pytest.raises(RuntimeError, match="u1_bias: expected dtype Float"):
        _C.gate_inh(h, pp.u1_weight, pp.u1_bias.double())
    with pytest.raises(RuntimeError, match="h: expected the shape of x"):
        _C.inhibit(x, x, h[:, :, :-1].contiguous(), *pp.norm_inh, pp.alpha, pp.mu, pp.u2_weight, pp.u2_bias)
    with pytest.raises(RuntimeError, match="norm kind: expected 'batch', 'group' or 'none'"):
        _C.normalize(x, "layer", None, None, 1e-3, 1)
    with pytest.raises(RuntimeError, match="norm groups: expected a positive divisor of C=5"):
        _C.norm_stats(x, "group", 2, 1e-3)
    with pytest.raises(RuntimeError, match="expected a CPU or CUDA tensor"):
        _C.gate_inh(h.to("meta"), pp.u1_weight.to("meta"), pp.u1_bias.to("meta"))
    h1, g2 = x.clone(), h.clone()
    with pytest.raises(RuntimeError, match="out: must not share memory with h1"):
        _C.excite_mix(x, h, h1, g2, *pp.norm_exc, pp.kappa, pp.gamma, pp.omega, out=h1)
    flat = torch.randn(x.numel() + 1)
    with pytest.raises(RuntimeError, match="out: may be c2_raw itself but must not partially overlap it"):
        _C.excite_mix(flat[1:].view(x.shape), h, h1, g2, *pp.norm_exc, pp.kappa, pp.gamma, pp.omega,
                      out=flat[:-1].view(x.shape))


def test_auto_falls_back_when_the_extension_is_missing(monkeypatch, caplog):
    import crbp_fast.hgru.native as native_pkg

    monkeypatch.delitem(backends._REGISTRY, "native")
    monkeypatch.setattr(backends, "_fallback_logged", set())
    monkeypatch.setattr(backends, "_load_errors", {})
    monkeypatch.delitem(sys.modules, "crbp_fast.hgru.native.hgru")
    monkeypatch.delattr(native_pkg, "hgru")
    monkeypatch.delattr(native_pkg, "_C")
    monkeypatch.setitem(sys.modules, "crbp_fast.hgru.native._C", None)  # the import now raises ImportError
    with caplog.at_level(logging.INFO, logger="crbp_fast"):
        assert backends.resolve_backend("auto", CPU).name == "torch"
        assert backends.resolve_backend("auto", CPU).name == "torch"
    assert sum("'native' is not available" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(RuntimeError, match=r"pip install --no-build-isolation -e \."):
        backends.resolve_backend("native", CPU)
    cell, x, h = make_problem(SMALL, 3, "batch", backend="auto")
    with torch.no_grad():
        assert_close(cell(x, h), reference.step(x, h, cell.params()), 1e-12)
    with pytest.raises(RuntimeError, match="backend 'native' is not available"):
        HGRUCell(5, 3, backend="native")(x.float())


# --------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("shape,k", [(SMALL, 3), ((2, 25, 40, 37), 15)], ids=lambda v: str(v))
def test_cuda_float32_matches_reference(norm, shape, k):
    cuda = torch.device("cuda")
    cell, x, h = make_problem(shape, k, norm, dtype=torch.float32, device=cuda)
    check_step_and_vjp(cell, x, h, 1e-4)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("norm", NORMS)
def test_cuda_bfloat16_storage(norm):
    """bf16 maps with fp32 arithmetic against the fp32 reference at the same (rounded) inputs."""
    cuda = torch.device("cuda")
    cell, x, h = make_problem((2, 25, 40, 37), 15, norm, dtype=torch.float32, device=cuda)
    with torch.no_grad():
        for param in cell.parameters():  # the bf16 cell below then holds the same values
            param.copy_(param.bfloat16().float())
    xb, hb = x.bfloat16(), h.bfloat16()
    cell_b = HGRUCell(25, 15, norm=norm, norm_groups=25 if norm == "group" else 1, backend="native", conv="direct")
    cell_b.load_state_dict(cell.state_dict())
    cell_b.to(device=cuda, dtype=torch.bfloat16)
    ref_out, ref_u = reference_vjp(cell, xb.float(), hb.float(), torch.ones_like(x))
    backend = backends.resolve_backend("native", cuda)
    with torch.no_grad():
        out = backend.step(cell_b.params(), xb, hb, DIRECT)
    lin = backend.linearize(cell_b.params(), xb, hb, DIRECT)
    assert out.dtype == torch.bfloat16 and isinstance(lin, native.NativeLinearization)
    assert_close(out.float(), ref_out, 3e-2, name="step")
    assert_close(lin.vjp(torch.ones_like(xb)).float(), ref_u, 5e-2, name="vjp")


@pytest.mark.gpu
@gpu
def test_cuda_engine_gradients_equal_torch_backend():
    cuda = torch.device("cuda")
    shape, k = (2, 25, 32, 30), 15
    cell, x, _ = make_problem(shape, k, "batch", dtype=torch.float32, device=cuda)
    ref_cell = HGRUCell(25, k, backend="torch", conv="direct", device=cuda)
    ref_cell.load_state_dict(cell.state_dict())
    target = torch.randn(shape, device=cuda)
    grads = []
    for c in (cell, ref_cell):
        xx = x.clone().requires_grad_(True)
        res = fixed_point(c, xx, steps=6, algorithm="crbp", adjoint_steps=8, adjoint_tol=0)
        ((res.state * target).sum() + res.penalty).backward()
        grads.append({"x": xx.grad, **{n: prm.grad for n, prm in c.named_parameters()}})
    for name, g in grads[0].items():
        assert_close(g, grads[1][name], 1e-3, name=name)


@pytest.mark.gpu
@gpu
def test_cuda_validation():
    cuda = torch.device("cuda")
    cell, x, h = make_problem(SMALL, 3, "batch", dtype=torch.float32, device=cuda)
    pp = native._prepare(cell.params(), x)
    with pytest.raises(RuntimeError, match="CUDA kernels take float32 or bfloat16"):
        _C.gate_inh(h.double(), pp.u1_weight.double(), pp.u1_bias.double())
    with pytest.raises(RuntimeError, match="u1_weight: expected device cuda"):
        _C.gate_inh(h, pp.u1_weight.cpu(), pp.u1_bias)
    with pytest.raises(RuntimeError, match="dhg_to_dm1: expected the device of dhg"):
        _C.vjp_gate_inh(h, h, h, x.cpu(), pp.u1_weight)
