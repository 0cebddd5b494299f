"""The Triton tracked-step passes (crbp_fast/hgru/triton/tracked.py, plane_kernels.py) against
the reference passes they implement: linearize_tracked, column_sums, step_vjp, each of the LCP
tangent's five passes and their composition, per norm and dtype; the tracked node of
``HGRUCell(backend="triton")`` and fixed_point's crbp gradients with them; the linearisation from
the tracked factors; the pass table against csrc/cpu/plane_passes.h; the entry point's checks.

On CPU the kernels run under triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1);
with CUDA the same tests run compiled on the GPU (the GPU run's full stage runs them all, its
smoke stage the ``gpu`` ones: every pass in both dtypes at a larger shape). conftest fills every torch.empty buffer with
NaN, so an output element a kernel does not write fails ``assert_close``. Shapes are odd; 13 x 11
planes take two blocks of the interpreter's 128 pixels (the second ragged), 20 x 17 three.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import types

import pytest
import torch

pytest.importorskip("triton")

from conftest import assert_close
from tracked_cases import (
    DTYPES,
    NORMS,
    SMALL,
    check_each_tangent_pass,
    close,
    close_fields,
    point,
    problem,
    random_like,
)

from crbp_fast import HGRUCell, fixed_point
from crbp_fast.hgru import reference as R
from crbp_fast.hgru import tracked as tracked_node
from crbp_fast.hgru.triton import hgru as triton_hgru
from crbp_fast.hgru.triton import tracked as T

DEV = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
BLOCKS3 = (2, 3, 20, 17)  # 340 pixels: three blocks per plane under the interpreter
# On the GPU, float32 convs and matmuls may differ from the CPU reference in TF32 unless the
# tests' full_float32 fixture is on; these tests compare passes on one device, so rounding only.
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


@pytest.fixture(autouse=True)
def _cuda_opt_in(monkeypatch):
    """On CUDA the passes are opt-in until their gpu tests have passed there: these tests opt in."""
    monkeypatch.setenv(T.CUDA_SWITCH, "1")


def on_dev(nt):
    if isinstance(nt, tuple) and hasattr(nt, "_fields"):
        return type(nt)(*(on_dev(v) for v in nt))
    if isinstance(nt, R.NormSpec):
        return R.NormSpec(nt.kind, on_dev(nt.weight), on_dev(nt.bias), nt.eps, nt.groups)
    return nt.to(DEV) if isinstance(nt, torch.Tensor) else nt


def at_point(norm, groups, dtype, shape=SMALL):
    return tuple(on_dev(v) for v in point(norm, groups, dtype, shape))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm, groups", NORMS, ids=[n for n, _ in NORMS])
def test_linearize_tracked_matches_reference(norm, groups, dtype):
    p, x, h = (on_dev(v) for v in problem(norm, groups, dtype))
    with torch.no_grad():
        f, t = R.linearize_tracked(x, h, p)
        fn, tn = T.linearize_tracked(x, h, p)
    close_fields(fn, f, TOL[dtype], "f")
    close_fields(tn, t, TOL[dtype], "t")


@pytest.mark.parametrize("shape", [SMALL, BLOCKS3], ids=["small", "three-blocks"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm, groups", NORMS, ids=[n for n, _ in NORMS])
def test_each_tangent_pass_matches_reference(norm, groups, dtype, shape):
    p, x, h, f, t, m = at_point(norm, groups, dtype, shape)
    rtol = TOL[dtype]
    check_each_tangent_pass(T, p, x, f, t, m, rtol)


@pytest.mark.parametrize("shape", [SMALL, BLOCKS3], ids=["small", "three-blocks"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm, groups", NORMS, ids=[n for n, _ in NORMS])
def test_column_sums_step_vjp_and_lcp_tangent_match_reference(norm, groups, dtype, shape):
    p, x, h, f, t, m = at_point(norm, groups, dtype, shape)
    v, w, rtol = torch.randn_like(x), torch.rand_like(x), TOL[dtype]
    with torch.no_grad():
        (u, maps), (u_ref, maps_ref) = T.column_sums(f, p), R.column_sums(f, p)
        close(u, u_ref, rtol, "u")
        close_fields(maps, maps_ref, rtol, "column_sums")
        fr, tr = random_like(f, x), random_like(t, x)
        close_fields(T.step_vjp(v, fr, tr, p), R.step_vjp(v, fr, tr, p), rtol, "step_vjp")
        for seed in (v, None):
            close_fields(T.lcp_tangent(w, f, t, m, p, v=seed), R.lcp_tangent(w, f, t, m, p, v=seed), rtol,
                         "lcp_tangent")


@pytest.mark.parametrize("norm, groups", NORMS, ids=[n for n, _ in NORMS])
def test_the_linearization_from_the_tracked_factors_matches_the_reference_vjp(norm, groups):
    p, x, h, f, t, m = at_point(norm, groups, torch.float64)
    lin = T.linearization(f, p, _Engine())
    assert isinstance(lin, triton_hgru.TritonLinearization)
    v = torch.randn_like(x)
    close(lin.state, f.state, 1e-12, "state")
    close(lin.vjp(v), R.step_vjp(v, f, t, p).h, 1e-12, "vjp")


class _Engine:
    conv, conv_transpose = staticmethod(R.conv_same), staticmethod(R.conv_same_transpose)


def test_the_triton_backend_runs_these_passes_in_its_tracked_step(monkeypatch):
    """HGRUCell(backend="triton"): the tracked node's forward and backward run this module's
    passes, and its gradients (state and penalty) equal the torch backend's."""
    calls = []
    for name in ("linearize_tracked", "column_sums", "tangent_excite_mix", "step_vjp"):
        fn = getattr(T, name)
        monkeypatch.setattr(T, name, lambda *a, _fn=fn, _name=name, **k: calls.append(_name) or _fn(*a, **k))
    grads = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        cell = HGRUCell(4, 3, backend=backend, dtype=torch.float64).to(DEV)
        x = torch.randn(2, 4, 9, 7, dtype=torch.float64, device=DEV).requires_grad_()
        h = torch.rand(2, 4, 9, 7, dtype=torch.float64, device=DEV)
        out, pen = cell.tracked_step(x, h, 0.1)
        grads[backend] = torch.autograd.grad(out.square().sum() + 3 * pen, (x, *cell.parameters()))
        out2 = cell.tracked_step(x, h)
        grads[backend + "-state"] = torch.autograd.grad(out2.square().sum(), (x, *cell.parameters()))
    assert calls == ["linearize_tracked", "column_sums", "tangent_excite_mix", "linearize_tracked", "step_vjp"]
    for key in ("", "-state"):
        for i, (a, b) in enumerate(zip(grads["triton" + key], grads["torch" + key])):
            assert_close(a, b, 1e-10, name=f"grad {i}{key}")


@pytest.mark.parametrize("algorithm", ["rbp", "crbp"])
def test_fixed_point_gradients_with_the_triton_passes_match_the_torch_backend(algorithm, monkeypatch):
    """fixed_point with backend="triton": the tracked node on these passes and the adjoint on the
    linearisation from its factors (``linearization_of``, once); gradients as the torch backend's."""
    made = []
    fn = T.linearization
    monkeypatch.setattr(T, "linearization", lambda *a, **k: made.append(fn(*a, **k)) or made[-1])
    grads = []
    for backend in ("torch", "triton"):
        torch.manual_seed(1)
        cell = HGRUCell(3, 3, norm="group", norm_groups=3, backend=backend, dtype=torch.float64).to(DEV)
        x = torch.randn(2, 3, 11, 9, dtype=torch.float64, device=DEV).requires_grad_()
        res = fixed_point(cell, x, steps=4, algorithm=algorithm, adjoint_steps=8, adjoint_tol=0.0, lcp_target=0.5)
        loss = res.state.square().mean() + (3.0 * res.penalty if res.penalty is not None else 0)
        grads.append(torch.autograd.grad(loss, (x, *cell.parameters())))
    assert len(made) == 1 and isinstance(made[0], triton_hgru.TritonLinearization)
    for i, (a, b) in enumerate(zip(*grads)):
        assert_close(b, a, 1e-10, name=f"grad {i}")


def test_the_cuda_passes_are_opt_in(monkeypatch):
    """Not yet run on a GPU: CUDA maps take the reference passes unless CRBP_FAST_CUDA_TRACKED=1
    (the interpreter's CPU maps always take these)."""
    monkeypatch.setattr(triton_hgru, "unavailable_reason", lambda device: "")
    cuda_map = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32, shape=(2, 4, 5, 5),
                                     dim=lambda: 4)
    assert T.supported(cuda_map)
    monkeypatch.delenv(T.CUDA_SWITCH)
    assert not T.supported(cuda_map)
    assert T.supported(torch.zeros(2, 4, 5, 5))


def test_passes_for_picks_the_triton_passes_where_they_run():
    x = torch.zeros(1, 4, 3, 3, device=DEV)
    assert tracked_node.passes_for("triton", x) is T
    assert tracked_node.passes_for("triton", x.half()) is None  # the autograd route
    assert tracked_node.passes_for("triton", torch.zeros(1, triton_hgru.MAX_CHANNELS + 1, 3, 3, device=DEV)) is None
    assert tracked_node.passes_for("torch", x) is None


# --------------------------------------------------------------------------------------------
# The table and the entry point


def test_the_pass_table_is_the_one_of_plane_passes_h():
    """Each row of SPECS (number, input and output names, scalar and sum counts, nullable and
    skippable sets) as csrc/cpu/plane_passes.h has it, so the backends cannot drift apart."""
    header = (pathlib.Path(__file__).resolve().parents[2] / "csrc" / "cpu" / "plane_passes.h").read_text()
    table = header[header.index("kPlanePassSpecs[kPlanePasses] = {"):]
    rows = re.findall(r'\{"(\w+)", (\d+), (\d+), (\d+), (\d+),\s*\{([^}]*)\},\s*\{([^}]*)\},\s*([^,]+),\s*([^}]+?)\}',
                      table)
    assert [r[0] for r in rows] == list(T.SPECS), "pass names or order"

    def bits(expr):
        """The names in a mask expression such as (1u << tex::xhat2) | (1u << tex::v)."""
        return set(re.findall(r"\w+::(\w+)", expr))

    for number, (name, n_in, n_out, n_s, n_sums, ins, outs, nullable, skippable) in enumerate(rows):
        spec = T.SPECS[name]
        assert spec.number == number, name
        assert spec.inputs == tuple(re.findall(r'"(\w+)"', ins)) and len(spec.inputs) == int(n_in), name
        assert spec.outputs == tuple(re.findall(r'"(\w+)"', outs)) and len(spec.outputs) == int(n_out), name
        assert (spec.scalars, spec.sums) == (int(n_s), int(n_sums)), name
        assert set(spec.nullable) == bits(nullable), f"{name}: nullable"
        assert set(spec.skippable) == bits(skippable), f"{name}: skippable"
    assert len(rows) == len(T.SPECS) == 14


def test_plane_pass_refuses_bad_arguments():
    a = torch.randn(2, 3, 5, 7, dtype=torch.float64, device=DEV)
    with pytest.raises(ValueError, match="name: expected one of .*got 'nope'"):
        T.plane_pass("nope", [a])
    with pytest.raises(ValueError, match=r"tangent_gate_inh: maps: expected 4 maps \('w', 'g1', 'h', 'm1'\), got 2"):
        T.plane_pass("tangent_gate_inh", [a, a])
    with pytest.raises(ValueError, match="tangent_gate_inh: g1: expected a tensor, got None"):
        T.plane_pass("tangent_gate_inh", [a, None, a, a])
    with pytest.raises(ValueError, match=r"h: expected a contiguous torch.float64 \(2, 3, 5, 7\) tensor"):
        T.plane_pass("tangent_gate_inh", [a, a, a[:, :2].contiguous(), a])
    with pytest.raises(ValueError, match="m1: expected a contiguous torch.float64"):
        T.plane_pass("tangent_gate_inh", [a, a, a, a.float()])
    with pytest.raises(ValueError, match=r"m1: expected a contiguous .* got torch.float64 \(2, 3, 5, 7\) tensor on "
                                         r"\w+(:\d)? with strides \(105, 35, 1, 5\)"):
        T.plane_pass("tangent_gate_inh", [a, a, a, a.transpose(2, 3).contiguous().transpose(2, 3)])
    with pytest.raises(ValueError, match="g1: expected a contiguous .* got ndarray"):
        T.plane_pass("tangent_gate_inh", [a, a.cpu().numpy(), a, a])
    with pytest.raises(ValueError, match="w: expected a float32/float64"):
        T.plane_pass("tangent_gate_inh", [a.half()] * 4)
    with pytest.raises(ValueError, match="scalars: expected None"):
        T.plane_pass("tangent_gate_inh", [a] * 4, torch.zeros(2, 3, 1, dtype=torch.float64, device=DEV))
    with pytest.raises(ValueError, match=r"tangent_inhibit: scalars: expected a contiguous torch.float64 \(2, 3, 5\) "
                                         r"tensor on \w+(:\d)?, got None"):
        T.plane_pass("tangent_inhibit", [a] * 7)
    with pytest.raises(ValueError, match=r"scalars: expected .*\(2, 3, 5\) tensor on .*, got torch.float64 \(2, 3, 4\)"):
        T.plane_pass("tangent_inhibit", [a] * 7, torch.zeros(2, 3, 4, dtype=torch.float64, device=DEV))
    with pytest.raises(ValueError, match=r"scalars: expected a contiguous torch.float32"):
        T.plane_pass("tangent_inhibit", [a.float()] * 7, torch.zeros(2, 3, 5, dtype=torch.float64, device=DEV))
    with pytest.raises(ValueError, match=r"tangent_inhibit: skip: expected a mask of the skippable outputs \(3\), "
                                         r"got 4"):
        T.plane_pass("tangent_inhibit", [a] * 7, torch.zeros(2, 3, 5, dtype=torch.float64, device=DEV), 4)


def test_plane_dot_sums_each_plane_across_blocks_and_skips_are_none():
    a, b = torch.randn(BLOCKS3, dtype=torch.float64, device=DEV), torch.randn(BLOCKS3, dtype=torch.float64, device=DEV)
    (sums,) = T.plane_pass("plane_dot", [a, b])
    assert sums.shape == (*BLOCKS3[:2], 2) and sums.dtype == torch.float64
    assert_close(sums[..., 0], a.sum((2, 3)), 1e-13, name="sum a")
    assert_close(sums[..., 1], (a * b).sum((2, 3)), 1e-13, name="sum a b")
    p, x, h, f, t, m = at_point("none", 1, torch.float64)
    scalars = torch.zeros(*x.shape[:2], 5, dtype=torch.float64, device=DEV)
    scalars[..., 0] = 1.0  # invstd
    outs = T.plane_pass("tangent_inhibit", [torch.randn_like(x), None, f.dc1_coef, t.c1, torch.rand_like(x), t.s_q,
                                            t.s_r], scalars, 0b11)
    assert outs[0] is None and outs[1] is None
    assert all(torch.isfinite(o).all() for o in outs[2:])


@pytest.mark.parametrize("name", [n for n, spec in T.SPECS.items() if spec.nullable])
def test_a_none_input_reads_as_zeros(name):
    """Every nullable input of every pass: None gives what a map of zeros gives (fresh random
    maps and positive scalars; outputs and sums compared exactly up to rounding)."""
    spec = T.SPECS[name]
    shape = (2, 3, 9, 7)
    maps = [torch.randn(shape, dtype=torch.float64, device=DEV) for _ in spec.inputs]
    scalars = (torch.rand(2, 3, spec.scalars, dtype=torch.float64, device=DEV) + 0.5) if spec.scalars else None
    for n in spec.nullable:
        i = spec.inputs.index(n)
        with_none = T.plane_pass(name, [None if j == i else m for j, m in enumerate(maps)], scalars)
        with_zeros = T.plane_pass(name, [torch.zeros_like(m) if j == i else m for j, m in enumerate(maps)], scalars)
        for k, (a, b) in enumerate(zip(with_none, with_zeros)):
            assert_close(a, b, 1e-14, name=f"{name}: {n}=None, output {k}")


def test_empty_maps_give_empty_outputs_and_zero_sums():
    a = torch.randn(2, 3, 0, 5, device=DEV)
    (sums,) = T.plane_pass("plane_dot", [a, a])
    assert torch.equal(sums, torch.zeros(2, 3, 2, dtype=torch.float64, device=DEV))
    outs = T.plane_pass("tangent_gate_inh", [a] * 4)
    assert [o.shape for o in outs] == [a.shape, a.shape]
    no_planes = torch.randn(0, 3, 4, 5, device=DEV)
    (sums,) = T.plane_pass("plane_dot", [no_planes, no_planes])
    assert sums.shape == (0, 3, 2)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (owed to the GPU run)")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm, groups", NORMS, ids=[n for n, _ in NORMS])
def test_the_compiled_passes_match_the_reference_at_a_larger_shape(norm, groups, dtype, full_float32):
    """Compiled for the GPU at 131 x 67 planes (18 blocks of 512 pixels, the last ragged) against
    the reference's ops on CUDA (no TF32); norm "none" and v=None take the variants that skip
    outputs and read inputs as zeros."""
    p, x, h, f, t, m = at_point(norm, groups, dtype, (3, 6, 131, 67))
    w, v, rtol = torch.rand_like(x), torch.randn_like(x), {torch.float32: 1e-4, torch.float64: 1e-11}[dtype]
    with torch.no_grad():
        fn, tn = T.linearize_tracked(x, h, p)
        close_fields(fn, f, rtol, "f")
        close_fields(tn, t, rtol, "t")
        (u, maps), (u_ref, maps_ref) = T.column_sums(f, p), R.column_sums(f, p)
        close(u, u_ref, rtol, "u")
        close_fields(maps, maps_ref, rtol, "column_sums")
        close_fields(T.step_vjp(v, f, t, p), R.step_vjp(v, f, t, p), rtol, "step_vjp")
        for seed in (v, None):
            close_fields(T.lcp_tangent(w, f, t, m, p, v=seed), R.lcp_tangent(w, f, t, m, p, v=seed), rtol,
                         "lcp_tangent")


_SM90_COMPILE = r"""
import inspect, os, re, subprocess, sys, tempfile
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from crbp_fast.hgru.triton import plane_kernels as P
from crbp_fast.hgru.triton.tracked import SPECS, _mask

assert not P.INTERPRETED
kernel = P.plane_pass_kernel
names = list(inspect.signature(kernel.fn).parameters)
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
for name, spec in SPECS.items():
    # Every input and output present, and the variant with every None and skip the table allows.
    variants = {(0, 0), (_mask(spec.inputs, spec.nullable), _mask(spec.outputs, spec.skippable))}
    for storage, acc in (("fp32", tl.float32), ("fp64", tl.float64)):
        for none, skip in sorted(variants):
            consts = {"PASS": spec.number, "NS": spec.scalars, "NSUM": spec.sums, "NONE": none, "SKIP": skip,
                      "BLOCK": 512, "ACC": acc}
            signature = {"ins": tuple(["*" + storage] * len(spec.inputs)),
                         "outs": tuple(["*" + storage] * max(1, len(spec.outputs))), "scalars": "*" + storage,
                         "sums": "*fp64" if spec.sums else "*" + storage, "HW": "i32", "BLOCKS": "i32",
                         **{n: "constexpr" for n in consts}}
            # As a launch specialises them for torch's allocations: 16-byte aligned pointers, and
            # HW a multiple of 16 (so loads vectorise: the most registers).
            div = [["tt.divisibility", 16]]
            attrs = {**{(0, i): div for i in range(len(spec.inputs))},
                     **{(1, i): div for i in range(len(signature["outs"]))}, (2,): div, (3,): div, (4,): div}
            src = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in consts.items()},
                            attrs=attrs)
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": P.NUM_WARPS})
            if os.path.exists(cuobjdump):
                with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                    f.write(compiled.asm["cubin"])
                    f.flush()
                    usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                                           text=True, check=True).stdout
                regs, local = (int(re.search(key + r":(\d+)", usage).group(1)) for key in ("REG", "LOCAL"))
                print(name, storage, none, skip, "REG", regs, "LOCAL", local)
                assert local == 0, f"{name} {storage}: {local} bytes of local memory (register spills)"
if not os.path.exists(cuobjdump):
    print("NO CUOBJDUMP")
"""


@pytest.mark.skipif(
    importlib.util.find_spec("triton.backends.nvidia") is None, reason="triton without its NVIDIA backend",
)
def test_the_plane_kernels_compile_for_sm90_without_spills():
    """Every pass's kernel, float32 and float64, with all inputs and with the Nones and skips the
    table allows, through triton's whole NVIDIA pipeline (PTX, ptxas) for an H100, outside the
    interpreter; with triton's cuobjdump, no local memory (register spills). Without a GPU this is
    the only check that they compile."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _SM90_COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if "NO CUOBJDUMP" in proc.stdout:
        pytest.skip("every variant compiled; triton has no cuobjdump here to read their register use")
    assert proc.stdout.count(" LOCAL 0") == len(proc.stdout.splitlines()) >= 2 * len(T.SPECS)
