"""The paper's shape on the GPU: every fused backend and conv engine against the reference.

On CUDA these run at B=32, C=25, 150 x 150, k=15 (the C-RBP Pathfinder set-up), in float32 with
TF32 off on both sides (cuDNN's default would put TF32 in the direct conv only), plus bfloat16
storage. Without CUDA the same checks run at a tiny shape on CPU (Triton under the interpreter,
the native C++ kernels), so CI exercises every line of them; ``scripts/gpu_checks.sh smoke``
runs this file on the GPU.

Tolerances (relative RMSE, float32): a fused step or VJP against the reference through the same
direct conv 2e-5; through the FFT engine 1e-4 (its transforms round differently from a direct
sum of k^2 C terms); the FFT engine's conv and adjoint against cuDNN 1e-4; a whole C-RBP
iteration's gradients 5e-4 (N = 10 steps and 10 adjoint products compound the rounding);
bfloat16 storage with float32 accumulation 3e-2 for a step, 8e-2 for a VJP.
"""

from __future__ import annotations

import os

import pytest
import torch

import backend_cases
from backend_cases import reference_vjp
from conftest import assert_close

from crbp_fast import HGRUCell, fixed_point
from crbp_fast.conv.engines import DIRECT
from crbp_fast.conv.fft import FFT
from crbp_fast.hgru.backends import resolve_backend

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
SHAPE, K = ((32, 25, 150, 150), 15) if CUDA else ((2, 5, 17, 13), 5)
ENGINES = {"direct": DIRECT, "fft": FFT}
RTOL = {"direct": 2e-5, "fft": 1e-4}


@pytest.fixture(autouse=True)
def _full_float32(full_float32):
    yield


def available(backend: str) -> None:
    """Skip, saying why, where this machine cannot run ``backend`` (a GPU run whose native build
    failed says so in its build stage; CI builds the extension and checks that it did)."""
    if backend == "native" and os.environ.get("CRBP_FAST_NO_EXT") == "1":
        pytest.skip("the native extension was not built (CRBP_FAST_NO_EXT=1)")
    resolve_backend(backend, DEVICE)  # raises, naming the reason, when it cannot run here


def problem(backend: str, dtype=torch.float32):
    return backend_cases.make_problem(SHAPE, K, "batch", backend=backend, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("conv", ENGINES)
@pytest.mark.parametrize("backend", ["triton", "native"])
def test_step_and_vjp(backend, conv):
    available(backend)
    cell, x, h = problem(backend)
    lin_type = type(resolve_backend(backend, DEVICE).linearize(cell.params(), x[:1], h[:1], DIRECT))
    backend_cases.check_step_and_vjp(backend, lin_type, cell, x, h, RTOL[conv], ENGINES[conv])


def test_fft_engine_against_direct_conv_and_its_adjoint():
    b, c, hgt, wid = SHAPE
    x = torch.randn(SHAPE, device=DEVICE)
    y = torch.randn(SHAPE, device=DEVICE)
    weight = (torch.randn(c, c, K, K, device=DEVICE) / (c * K)).requires_grad_(True)
    FFT.clear_cache()
    out = FFT.conv(x, weight)
    assert_close(out, DIRECT.conv(x, weight), 1e-4, name="fft conv")
    assert_close(FFT.conv_transpose(y, weight), DIRECT.conv_transpose(y, weight), 1e-4, name="fft adjoint conv")
    (grad_fft,) = torch.autograd.grad((out * y).sum(), weight)
    (grad_direct,) = torch.autograd.grad((DIRECT.conv(x, weight) * y).sum(), weight)
    assert_close(grad_fft, grad_direct, 1e-4, name="fft weight gradient")


def test_crbp_iteration_gradients_of_the_defaults_equal_the_reference():
    """``HGRUCell()`` as a user makes it (backend and conv "auto") through a whole C-RBP
    iteration: the drive's and every parameter's gradient against the reference cell."""
    ref, x, _ = backend_cases.make_problem(SHAPE, K, "batch", backend="torch", dtype=torch.float32, device=DEVICE)
    fast = HGRUCell(SHAPE[1], K, device=DEVICE)
    fast.load_state_dict(ref.state_dict())
    grads = []
    for cell in (ref, fast):
        drive = x.clone().requires_grad_(True)
        res = fixed_point(cell, drive, steps=10, algorithm="crbp", adjoint_steps=10, adjoint_tol=0)
        loss = res.state.square().mean() + 10 * res.penalty
        grads.append(torch.autograd.grad(loss, [drive, *cell.parameters()]))
    names = ["x", *(n for n, _ in ref.named_parameters())]
    for name, g_fast, g_ref in zip(names, grads[1], grads[0]):
        assert_close(g_fast, g_ref, 5e-4, name=f"gradient of {name}")


@pytest.mark.skipif(not CUDA, reason="bfloat16 storage runs on CUDA only (the CPU kernels are float32/float64)")
@pytest.mark.parametrize("backend", ["triton", "native"])
def test_bfloat16_storage(backend):
    available(backend)
    cell, x, h = problem(backend)
    v = torch.randn_like(x)
    ref_out, ref_u = reference_vjp(cell, x, h, v)
    cell.to(torch.bfloat16)
    fused = resolve_backend(backend, DEVICE)
    with torch.no_grad():
        out = fused.step(cell.params(), x.bfloat16(), h.bfloat16(), DIRECT)
        lin = fused.linearize(cell.params(), x.bfloat16(), h.bfloat16(), DIRECT)
        u = lin.vjp(v.bfloat16())
    assert out.dtype == torch.bfloat16 and u.dtype == torch.bfloat16
    assert_close(out, ref_out, 3e-2, name="bf16 step")
    assert_close(u, ref_u, 8e-2, name="bf16 vjp")
