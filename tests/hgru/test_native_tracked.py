"""The native tracked-step passes (crbp_fast/hgru/native/tracked.py, csrc/cpu/plane_impl.h)
against the reference passes they implement: linearize_tracked, column_sums, step_vjp, each of
the LCP tangent's five passes, and their composition, per norm, dtype, instruction set and thread count; plus the
validation of the plane-pass entry point.

Every output the extension allocates is NaN-filled first (CRBP_FAST_DEBUG_NAN_FILL=1), so an
element a kernel does not write fails ``assert_close``; inputs are fresh random maps (not
consistent factors: each pass is a formula, checked as one). Shapes are odd, and one has planes
larger than a work chunk (8192 elements), so per-plane sums are merged across chunks.
"""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch
from conftest import CPU_ISAS, assert_close, cpu_isa, cpu_runs
from tracked_cases import (
    DTYPES,
    NORMS,
    RTOL,
    SMALL,
    check_each_tangent_pass,
    close,
    close_fields,
    point,
    problem,
    random_like,
)

from crbp_fast import HGRUCell
from crbp_fast.hgru import reference as R

try:
    from crbp_fast.hgru.native import _C
    from crbp_fast.hgru.native import tracked as N
except ImportError as err:
    import os

    if os.environ.get("CRBP_FAST_NO_EXT") == "1":
        pytest.skip(f"built without the native extension (CRBP_FAST_NO_EXT=1): {err}", allow_module_level=True)
    raise

LARGE = (2, 3, 97, 91)  # 8827 pixels per plane: two chunks


# conftest's fixture for every test here: NaN-filled extension outputs.
pytestmark = pytest.mark.usefixtures("nan_filled_outputs")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm, groups", NORMS, ids=[n for n, _ in NORMS])
def test_linearize_tracked_matches_reference(norm, groups, dtype, threads):
    p, x, h = problem(norm, groups, dtype)
    with torch.no_grad():
        f, t = R.linearize_tracked(x, h, p)
        fn, tn = N.linearize_tracked(x, h, p)
    close_fields(fn, f, RTOL[dtype], "f")
    close_fields(tn, t, RTOL[dtype], "t")


@pytest.mark.parametrize("shape", [SMALL, LARGE], ids=["small", "two-chunks"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm, groups", NORMS, ids=[n for n, _ in NORMS])
def test_each_tangent_pass_matches_reference(norm, groups, dtype, shape, threads):
    p, x, h, f, t, m = point(norm, groups, dtype, shape)
    rtol = RTOL[dtype]
    check_each_tangent_pass(N, p, x, f, t, m, rtol)


@pytest.mark.parametrize("shape", [SMALL, LARGE], ids=["small", "two-chunks"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm, groups", NORMS, ids=[n for n, _ in NORMS])
def test_column_sums_and_step_vjp_match_reference(norm, groups, dtype, shape, threads):
    p, x, h, f, t, m = point(norm, groups, dtype, shape)
    f, t = random_like(f, x), random_like(t, x)
    v, rtol = torch.randn_like(x), RTOL[dtype]
    with torch.no_grad():
        (u, maps), (u_ref, maps_ref) = N.column_sums(f, p), R.column_sums(f, p)
        close(u, u_ref, rtol, "u")
        close_fields(maps, maps_ref, rtol, "column_sums")
        close_fields(N.step_vjp(v, f, t, p), R.step_vjp(v, f, t, p), rtol, "step_vjp")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm, groups", NORMS, ids=[n for n, _ in NORMS])
def test_lcp_tangent_matches_reference(norm, groups, dtype):
    p, x, h, f, t, m = point(norm, groups, dtype)
    w, v = torch.rand_like(x), torch.randn_like(x)
    with torch.no_grad():
        for seed in (v, None):
            close_fields(N.lcp_tangent(w, f, t, m, p, v=seed), R.lcp_tangent(w, f, t, m, p, v=seed), RTOL[dtype],
                         "lcp_tangent")


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_each_cpu_instruction_set(isa):
    if not cpu_runs(isa):
        pytest.skip(f"this CPU does not run the {isa} kernels")
    with cpu_isa(isa):
        for dtype in DTYPES:
            p, x, h, f, t, m = point("group", 3, dtype)
            w, v = torch.rand_like(x), torch.randn_like(x)
            with torch.no_grad():
                close_fields(N.linearize_tracked(x, h, p)[0], f, RTOL[dtype], f"{isa}: f")
                close_fields(N.lcp_tangent(w, f, t, m, p, v=v), R.lcp_tangent(w, f, t, m, p, v=v), RTOL[dtype],
                             f"{isa}: lcp_tangent")
                close_fields(N.column_sums(f, p)[1], m, RTOL[dtype], f"{isa}: column_sums")
                close_fields(N.step_vjp(v, f, t, p), R.step_vjp(v, f, t, p), RTOL[dtype], f"{isa}: step_vjp")


def test_plane_dot_sums_each_plane_across_chunks():
    a, b = torch.randn(LARGE, dtype=torch.float64), torch.randn(LARGE, dtype=torch.float64)
    (sums,) = _C.plane_pass("plane_dot", [a, b])
    assert sums.shape == (*LARGE[:2], 2) and sums.dtype == torch.float64
    assert_close(sums[..., 0], a.sum((2, 3)), 1e-13, name="sum a")
    assert_close(sums[..., 1], (a * b).sum((2, 3)), 1e-13, name="sum a b")


def test_the_native_backend_runs_these_passes_in_its_tracked_step(monkeypatch):
    """HGRUCell(backend="native") on CPU: the tracked node's forward and backward run this
    module's passes (backend="torch": the reference's)."""
    calls = []
    for name in ("linearize_tracked", "column_sums", "tangent_excite_mix"):
        fn = getattr(N, name)
        monkeypatch.setattr(N, name, lambda *a, _fn=fn, _name=name, **k: calls.append(_name) or _fn(*a, **k))
    for backend, want in (("torch", []), ("native", ["linearize_tracked", "column_sums", "tangent_excite_mix"])):
        calls.clear()
        torch.manual_seed(0)
        cell = HGRUCell(4, 3, backend=backend, dtype=torch.float64)
        x, h = torch.randn(2, 4, 9, 7, dtype=torch.float64), torch.rand(2, 4, 9, 7, dtype=torch.float64)
        out, pen = cell.tracked_step(x.requires_grad_(), h, 0.1)
        (out.sum() + pen).backward()
        assert calls == want, backend


# --------------------------------------------------------------------------------------------
# CUDA (owed to the GPU run: csrc/cuda/hgru_cuda.cu runs the same kernel bodies per element)

gpu = pytest.mark.skipif(not (torch.cuda.is_available() and _C.with_cuda()),
                         reason="needs a CUDA device and a CUDA build of crbp_fast.hgru.native (owed to the GPU run)")


def _cuda(spec):
    return dataclasses.replace(spec, **{k: getattr(spec, k).cuda() for k in ("weight", "bias")
                                        if getattr(spec, k) is not None})


def test_the_cuda_passes_are_opt_in_and_not_deterministic(monkeypatch):
    """Not yet run on a GPU: CUDA maps take the reference passes unless CRBP_FAST_CUDA_TRACKED=1,
    and under torch.use_deterministic_algorithms (their sums are float64 atomics)."""
    monkeypatch.setattr(N._C, "with_cuda", lambda: True)
    cuda_map = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)
    monkeypatch.delenv(N.CUDA_SWITCH, raising=False)
    assert not N.supported(cuda_map)
    monkeypatch.setenv(N.CUDA_SWITCH, "1")
    assert N.supported(cuda_map)
    assert not N.supported(types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16))
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert not N.supported(cuda_map)
    assert N.supported(torch.zeros(1))  # CPU: always


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape", [(3, 6, 131, 67), (2, 6, 211, 203)], ids=["small", "grid-stride"])
@pytest.mark.parametrize("norm, groups", NORMS, ids=[n for n, _ in NORMS])
def test_the_passes_on_cuda_match_the_reference(norm, groups, shape, full_float32, monkeypatch):
    """float32 on CUDA against the reference's ops on CUDA; 211 x 203 pixels per plane is more
    than one grid row of the plane kernels (128 blocks of 256 threads), so threads loop."""
    monkeypatch.setenv(N.CUDA_SWITCH, "1")
    p, x, h = problem(norm, groups, torch.float32, shape=shape)
    p = R.HGRUParams(*(_cuda(v) if isinstance(v, R.NormSpec) else v.cuda() for v in p))
    x, h = x.cuda(), h.cuda()
    rtol = 1e-4
    with torch.no_grad():
        f, t = R.linearize_tracked(x, h, p)
        fn, tn = N.linearize_tracked(x, h, p)
        close_fields(fn, f, rtol, "f")
        close_fields(tn, t, rtol, "t")
        (u, m), (u_n, m_n) = R.column_sums(f, p), N.column_sums(f, p)
        close(u_n, u, rtol, "u")
        close_fields(m_n, m, rtol, "column_sums")
        w, v = torch.rand_like(x), torch.randn_like(x)
        close_fields(N.step_vjp(v, f, t, p), R.step_vjp(v, f, t, p), rtol, "step_vjp")
        for seed in (v, None):
            close_fields(N.lcp_tangent(w, f, t, m, p, v=seed), R.lcp_tangent(w, f, t, m, p, v=seed), rtol,
                         "lcp_tangent")


@pytest.mark.gpu
@gpu
def test_cuda_plane_sums_over_more_planes_than_a_grid_column():
    """65535 planes per grid column: 2 x 33000 planes make the kernel stride over blockIdx.y."""
    a, b = torch.randn(2, 33000, 1, 3, device="cuda"), torch.randn(2, 33000, 1, 3, device="cuda")
    (sums,) = _C.plane_pass("plane_dot", [a, b])
    assert_close(sums[..., 0], a.double().sum((2, 3)), 1e-6, name="sum a")
    assert_close(sums[..., 1], (a.double() * b.double()).sum((2, 3)), 1e-6, name="sum a b")


@pytest.mark.gpu
@gpu
def test_the_cuda_plane_passes_refuse_bfloat16():
    a = torch.randn(2, 3, 5, 7, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="the CUDA plane passes take float32, got BFloat16"):
        _C.plane_pass("plane_dot", [a, a])


# --------------------------------------------------------------------------------------------
# Validation of the entry point


def test_plane_pass_refuses_bad_arguments():
    a = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="plane_pass: expected one of plane_dot, .*got 'nope'"):
        _C.plane_pass("nope", [a])
    with pytest.raises(RuntimeError, match="tangent_gate_inh: expected 4 input maps, got 2"):
        _C.plane_pass("tangent_gate_inh", [a, a])
    with pytest.raises(RuntimeError, match="tangent_gate_inh: g1: expected a tensor, got None"):
        _C.plane_pass("tangent_gate_inh", [a, None, a, a])
    with pytest.raises(RuntimeError, match="h: expected the shape of w"):
        _C.plane_pass("tangent_gate_inh", [a, a, a[:, :2].contiguous(), a])
    with pytest.raises(RuntimeError, match="m1: expected the dtype of w"):
        _C.plane_pass("tangent_gate_inh", [a, a, a, a.float()])
    with pytest.raises(RuntimeError, match="m1: expected a contiguous tensor"):
        _C.plane_pass("tangent_gate_inh", [a, a, a, a.transpose(2, 3).contiguous().transpose(2, 3)])
    with pytest.raises(RuntimeError, match="scalars: expected None"):
        _C.plane_pass("tangent_gate_inh", [a] * 4, torch.zeros(2, 3, 1, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"tangent_inhibit: scalars: expected a \(B, C, 5\) tensor, got None"):
        _C.plane_pass("tangent_inhibit", [a] * 7)
    with pytest.raises(RuntimeError, match=r"scalars: expected shape \[2, 3, 5\]"):
        _C.plane_pass("tangent_inhibit", [a] * 7, torch.zeros(2, 3, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="scalars: expected dtype Float"):
        _C.plane_pass("tangent_inhibit", [a.float()] * 7, torch.zeros(2, 3, 5, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"tangent_inhibit: skip: expected a mask of the skippable outputs \(3\), "
                                           r"got 4"):
        _C.plane_pass("tangent_inhibit", [a] * 7, torch.zeros(2, 3, 5, dtype=torch.float64), 4)
    with pytest.raises(RuntimeError, match="the CPU kernels take float32 or float64, got Half"):
        _C.plane_pass("plane_dot", [a.half(), a.half()])
    meta = torch.empty(2, 3, 5, 7, device="meta")
    with pytest.raises(RuntimeError, match="expected a CPU or CUDA tensor|CPU only"):
        _C.plane_pass("plane_dot", [meta, meta])


def test_a_skipped_output_is_none_and_the_rest_is_written():
    p, x, h, f, t, m = point("none", 1, torch.float64)
    c1_raw_t, w = torch.randn_like(x), torch.rand_like(x)
    scalars = torch.zeros(*x.shape[:2], 5, dtype=torch.float64)
    scalars[..., 0] = 1.0  # invstd
    outs = _C.plane_pass("tangent_inhibit", [c1_raw_t, None, f.dc1_coef, t.c1, w, t.s_q, t.s_r], scalars, 0b11)
    assert outs[0] is None and outs[1] is None
    assert all(torch.isfinite(o).all() for o in outs[2:])
