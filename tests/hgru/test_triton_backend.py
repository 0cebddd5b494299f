"""The Triton backend against the reference: the step, linearize / vjp, the engine's gradients,
torch.compile tracing.

On CPU the kernels run under triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before any kernel is defined, where no CUDA device exists), on small odd shapes; with CUDA the
same small-shape tests run compiled on the GPU (``DEV``), except the few that check the
interpreter path itself; tests marked ``gpu`` need CUDA. The autouse
fixture of conftest fills every torch.empty buffer with NaN, so an output element a kernel does
not write fails ``assert_close``.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

import backend_cases  # noqa: E402
from backend_cases import reference_vjp  # noqa: E402
from conftest import assert_close, shape_id  # noqa: E402

from crbp_fast import HGRUCell, fixed_point  # noqa: E402
from crbp_fast.conv.engines import DIRECT  # noqa: E402
from crbp_fast.conv.fft import FFT  # noqa: E402
from crbp_fast.hgru import reference  # noqa: E402
from crbp_fast.hgru.backends import resolve_backend  # noqa: E402
from crbp_fast.hgru.triton import bandwidth  # noqa: E402
from crbp_fast.hgru.triton import hgru as triton_hgru  # noqa: E402

NORMS = ("batch", "group", "none")
CPU = torch.device("cpu")
DEV = torch.device("cuda") if torch.cuda.is_available() else CPU  # where the Triton kernels run here
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
interpreter_only = pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the CPU interpreter path; with CUDA the kernels are compiled",
)


def make_problem(shape, k, norm, *, groups=None, dtype=torch.float32, device=DEV, backend="triton"):
    return backend_cases.make_problem(shape, k, norm, backend=backend, dtype=dtype, groups=groups, device=device)


def check_step_and_vjp(cell, x, h, rtol, engine=DIRECT):
    backend_cases.check_step_and_vjp("triton", triton_hgru.TritonLinearization, cell, x, h, rtol, engine)


SMALL = (3, 5, 13, 11)


@pytest.mark.parametrize("k", [3, 5], ids=lambda k: shape_id(*SMALL, k))
@pytest.mark.parametrize("norm", NORMS)
def test_step_and_vjp_match_reference(norm, k):
    cell, x, h = make_problem(SMALL, k, norm)
    check_step_and_vjp(cell, x, h, rtol=1e-5)


@pytest.mark.parametrize("norm", NORMS)
def test_step_and_vjp_match_reference_float64(norm):
    cell, x, h = make_problem(SMALL, 3, norm, dtype=torch.float64)
    check_step_and_vjp(cell, x, h, rtol=1e-12)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_several_chunks_per_plane(norm):
    """340-pixel planes: two chunks per plane and per sample (under the interpreter's chunk
    sizes), the second ragged, and groups of two channels, so the per-chunk partials and their
    merge are exercised."""
    cell, x, h = make_problem((2, 4, 20, 17), 3, norm, groups=2)
    check_step_and_vjp(cell, x, h, rtol=1e-5)


def test_fft_conv_engine():
    cell, x, h = make_problem(SMALL, 5, "batch")
    check_step_and_vjp(cell, x, h, rtol=1e-5, engine=FFT)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_norm_stats_without_cancellation(norm):
    """|mean| >> std: shifted per-chunk moments keep the variance that sum / sum-of-squares loses."""
    c_raw = 1000 + 0.01 * torch.randn(2, 4, 20, 17, device=DEV)
    spec = reference.NormSpec(norm, torch.ones(4, device=DEV), torch.zeros(4, device=DEV), 1e-12, 2)
    mean, invstd = triton_hgru.norm_stats(c_raw, spec)
    ref_mean, ref_invstd = (t.expand(2, 4, 1, 1).reshape(2, 4) for t in reference.norm_stats(c_raw.double(), spec))
    assert_close(mean, ref_mean, 1e-7, name="mean")
    assert_close(invstd, ref_invstd, 1e-5, name="invstd")


def test_strided_inputs():
    cell, x, h = make_problem(SMALL, 3, "batch")
    xs = x.transpose(2, 3).contiguous().transpose(2, 3)
    hs = h.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    assert not xs.is_contiguous() and not hs.is_contiguous()
    with torch.no_grad():
        out = triton_hgru.step(xs, hs, cell.params())
    assert_close(out, reference.step(x, h, cell.params()).detach(), 1e-5, name="step on strided inputs")


def test_cell_forward_runs_fused_only_without_grad(monkeypatch):
    calls = []
    fused = triton_hgru.step

    def spy(*args):
        calls.append(1)
        return fused(*args)

    monkeypatch.setattr(triton_hgru, "step", spy)
    cell, x, h = make_problem(SMALL, 3, "batch")
    with torch.no_grad():
        cell(x, h)
    assert calls == [1]
    out = cell(x, h)  # parameters require grad: the differentiable reference composition
    assert calls == [1] and out.requires_grad


@pytest.mark.parametrize("algorithm", ["rbp", "crbp"])
def test_engine_gradients_match_torch_backend(algorithm):
    """Same state_dict, same drive: the untracked steps and the adjoint's J^T v run fused on one
    side and in the reference on the other; every gradient (LCP penalty included) agrees."""
    torch_cell, x, _ = make_problem((2, 3, 9, 7), 3, "batch", backend="torch")
    triton_cell = HGRUCell(3, 3, backend="triton", conv="direct", device=DEV)
    triton_cell.load_state_dict(torch_cell.state_dict())
    weight = torch.randn_like(x)
    grads = []
    for cell in (torch_cell, triton_cell):
        drive = x.clone().requires_grad_(True)
        res = fixed_point(cell, drive, steps=3, algorithm=algorithm, adjoint_steps=2, adjoint_tol=0)
        loss = (res.state * weight).sum()
        if res.penalty is not None:
            loss = loss + 10 * res.penalty
        grads.append(torch.autograd.grad(loss, [drive, *cell.parameters()]))
        assert res.stats.adjoint_iterations == 2
    names = ["x"] + [name for name, _ in torch_cell.named_parameters()]
    for name, g_torch, g_triton in zip(names, *grads):
        assert_close(g_triton, g_torch, 1e-4, name=f"d/d{name}")


def test_compile_traces_step_and_vjp():
    """torch.compile (dynamo + AOT autograd over the ops' fake implementations) of the no-grad
    step and of the VJP, without graph breaks. Inductor code generation is checked on GPU."""
    cell, x, h = make_problem(SMALL, 3, "group")
    params = cell.params()
    step = torch.compile(lambda x, h: triton_hgru.step(x, h, params), backend="aot_eager", fullgraph=True)
    v = torch.randn_like(x)
    with torch.no_grad():
        factors = triton_hgru.linearize(x, h, params)
        vjp = torch.compile(lambda v: triton_hgru.vjp(v, factors, params), backend="aot_eager", fullgraph=True)
        assert_close(step(x, h), triton_hgru.step(x, h, params), 1e-6, name="compiled step")
        assert_close(vjp(v), triton_hgru.vjp(v, factors, params), 1e-6, name="compiled vjp")


@interpreter_only
def test_availability(monkeypatch):
    assert resolve_backend("triton", CPU).name == "triton"
    assert resolve_backend("auto", CPU).name != "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET=1" in triton_hgru.unavailable_reason(CPU)
    with pytest.raises(RuntimeError, match="cannot run on device cpu"):
        resolve_backend("triton", CPU)


def test_wide_cells_fall_back_to_the_reference(monkeypatch, caplog):
    monkeypatch.setattr(triton_hgru, "MAX_CHANNELS", 4)
    cell, x, h = make_problem((2, 5, 6, 5), 3, "batch")
    backend = resolve_backend("triton", DEV)
    with torch.no_grad():
        out = backend.step(cell.params(), x, h, DIRECT)
    lin = backend.linearize(cell.params(), x, h, DIRECT)
    assert not isinstance(lin, triton_hgru.TritonLinearization)
    assert_close(out, reference.step(x, h, cell.params()), 1e-6, name="fallback step")
    assert "exceed the fused kernels' limit" in caplog.text


def test_bandwidth_rows():
    """The GPU bandwidth check's code path, on a tiny shape (the numbers mean nothing here)."""
    rows = bandwidth.measure((1, 2, 5, 4), 3, "batch", torch.float32, DEV, repeats=1)
    assert [row["pass"] for row in rows[-2:]] == ["step passes", "vjp passes"]
    assert rows[-2]["tensors"] == 12 and rows[-1]["tensors"] == 27
    assert all(row["gbps"] > 0 and row["fraction_of_copy"] > 0 for row in rows)


_SM90_COMPILE = """
import inspect
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from crbp_fast.hgru.triton import kernels as K

STATS = {"shift_ptr", "dmean_ptr", "m2_ptr", "sum_ptr", "sumx_ptr", "nm_ptr", "ns_ptr", "ka_ptr", "kb_ptr", "kc_ptr"}
PLANE = {"CHUNK": K.PLANE_CHUNK, "BLOCK": 1024}
TILE = {"CHUNK": K.TILE_CHUNK, "BLOCK_C": 32, "BLOCK_P": 32}
CASES = [
    (K._moments_kernel, ("HW", "S"), PLANE),
    (K._gate_inh_kernel, ("C", "HW"), {"LIN": True, **TILE}),
    (K._inhibit_kernel, ("C", "HW"), {"NORM": True, "LIN": True, **PLANE}),
    (K._excite_mix_kernel, ("C", "HW"), {"NORM": True, "LIN": True, **TILE}),
    (K._vjp_excite_mix_kernel, ("C", "HW", "S"), {"NORM": True, **TILE}),
    (K._norm_vjp_kernel, ("HW",), PLANE),
    (K._vjp_inhibit_kernel, ("HW", "S"), {"NORM": True, **PLANE}),
    (K._vjp_gate_inh_kernel, ("C", "HW"), TILE),
]
assert not K.INTERPRETED
for storage in ("fp32", "bf16"):
    for kernel, ints, consts in CASES:
        names = list(inspect.signature(kernel.fn).parameters)
        consts = {**consts, "ACC": tl.float32}
        signature = {
            n: "constexpr" if n in consts else "i32" if n in ints else "*fp32" if n in STATS else "*" + storage
            for n in names
        }
        src = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in consts.items()})
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
"""


@pytest.mark.skipif(
    importlib.util.find_spec("triton.backends.nvidia") is None, reason="triton without its NVIDIA backend",
)
def test_kernels_compile_for_sm90():
    """The kernels go through triton's whole NVIDIA pipeline (TTIR, TTGIR, LLVM, PTX, ptxas) for
    an H100, outside the interpreter, in float32 and bfloat16 storage: without a GPU this is the
    only check that they compile; with one it also covers the variants the GPU tests do not launch."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _SM90_COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_autotune_key_holds_the_variant_switches():
    """Each compiled variant (with / without the norm, with / without the factor stores) is tuned
    on its own: the switches a kernel takes are part of its autotune key."""
    from crbp_fast.hgru.triton import kernels as K

    for name in ("moments", "gate_inh", "inhibit", "excite_mix", "vjp_excite_mix", "norm_vjp", "vjp_inhibit",
                 "vjp_gate_inh"):
        tuner = getattr(K, name)
        takes = set(inspect.signature(tuner.fn.fn).parameters) & set(K.VARIANT_FLAGS)
        assert takes <= set(tuner.keys), (name, tuner.keys)
        assert {"HW"} <= set(tuner.keys), (name, tuner.keys)
    assert {"NORM", "LIN"} <= set(K.inhibit.keys) and {"NORM", "LIN"} <= set(K.excite_mix.keys)


@interpreter_only
def test_rejects_half_precision_on_cpu():
    cell, x, h = make_problem(SMALL, 3, "none")
    with pytest.raises(TypeError, match="supports dtypes"):
        triton_hgru.step(x.bfloat16(), h.bfloat16(), cell.params())


# --------------------------------------------------------------------------------------------
# GPU


CUDA_SHAPE = (4, 25, 67, 61)


@pytest.fixture
def exact_cuda_convs(full_float32):
    """No TF32 in the convolutions, so both sides compute the same float32 convolution."""
    yield


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_gpu_step_and_vjp(norm, dtype, exact_cuda_convs):
    cell, x, h = make_problem(CUDA_SHAPE, 15, norm, dtype=dtype, device=torch.device("cuda"))
    check_step_and_vjp(cell, x, h, rtol=1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_gpu_autocast_storage(dtype, exact_cuda_convs):
    """Under autocast the intermediates and factors are stored in half precision (float32
    accumulation): close to the float32 reference at half-precision tolerance."""
    cell, x, h = make_problem(CUDA_SHAPE, 15, "batch", device=torch.device("cuda"))
    v = torch.randn_like(x)
    ref_out, ref_u = reference_vjp(cell, x, h, v)
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        assert triton_hgru.storage_dtype(x) == dtype
        out = cell(x, h)
        lin = cell.linearize(x, h)
    assert out.dtype == lin.state.dtype == torch.float32
    assert_close(out, ref_out, 2e-2, name="autocast step")
    assert_close(lin.vjp(v), ref_u, 5e-2, name="autocast vjp")


@pytest.mark.gpu
@gpu
def test_gpu_bfloat16_cell(exact_cuda_convs):
    cell, x, h = make_problem(CUDA_SHAPE, 15, "group", groups=5, device=torch.device("cuda"))
    v = torch.randn_like(x)
    ref_out, ref_u = reference_vjp(cell, x, h, v)
    cell = cell.to(torch.bfloat16)
    with torch.no_grad():
        out = cell(x.bfloat16(), h.bfloat16())
    lin = cell.linearize(x.bfloat16(), h.bfloat16())
    assert out.dtype == torch.bfloat16
    assert_close(out, ref_out, 3e-2, name="bf16 step")
    assert_close(lin.vjp(v.bfloat16()), ref_u, 8e-2, name="bf16 vjp")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("algorithm", ["rbp", "crbp"])
def test_gpu_engine_gradients_match_torch_backend(algorithm, exact_cuda_convs):
    cuda = torch.device("cuda")
    torch_cell, x, _ = make_problem(CUDA_SHAPE, 15, "batch", backend="torch", device=cuda)
    triton_cell = HGRUCell(25, 15, backend="triton", conv="direct", device=cuda)
    triton_cell.load_state_dict(torch_cell.state_dict())
    grads = []
    for cell in (torch_cell, triton_cell):
        drive = x.clone().requires_grad_(True)
        res = fixed_point(cell, drive, steps=6, algorithm=algorithm, adjoint_steps=6, adjoint_tol=0)
        loss = res.state.square().mean() + (10 * res.penalty if res.penalty is not None else 0)
        grads.append(torch.autograd.grad(loss, [drive, *cell.parameters()]))
    for g_torch, g_triton in zip(*grads):
        assert_close(g_triton, g_torch, 1e-4, name="engine gradient")


@pytest.mark.gpu
@gpu
def test_gpu_inductor_compiles_step_and_vjp(exact_cuda_convs):
    cell, x, h = make_problem(CUDA_SHAPE, 15, "batch", device=torch.device("cuda"))
    params = cell.params()
    v = torch.randn_like(x)
    with torch.no_grad():
        factors = triton_hgru.linearize(x, h, params)
        step = torch.compile(lambda x, h: triton_hgru.step(x, h, params), fullgraph=True)
        vjp = torch.compile(lambda v: triton_hgru.vjp(v, factors, params), fullgraph=True)
        assert_close(step(x, h), triton_hgru.step(x, h, params), 1e-5, name="inductor step")
        assert_close(vjp(v), triton_hgru.vjp(v, factors, params), 1e-5, name="inductor vjp")
