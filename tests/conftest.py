"""Shared test fixtures: NaN-poisoned output buffers, tolerance checks, readable ids."""

from __future__ import annotations

import contextlib

import os

import pytest
import torch

# The Triton interpreter must be chosen before any triton kernel is defined, and only where no
# CUDA device exists: with one, the kernels are compiled for it (the interpreter would run them
# on host copies of CUDA tensors, and under triton 3.6 with numpy >= 2 it fails outright).
# ``torch.cuda.is_available`` does not import triton, so asking it first is safe.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# tests/panoptic needs torchvision, which does not import beside the core environment's CPU torch
# (DESIGN section 5). scripts/test_vision.sh runs it in .venv-vision with CRBP_VISION_TESTS=1;
# the core run does not collect it at all, rather than skipping its tests one by one.
collect_ignore = [] if os.environ.get("CRBP_VISION_TESTS") == "1" else ["panoptic"]


@pytest.fixture(autouse=True)
def _seed_and_poison(monkeypatch):
    """Fresh seeds per test, and every torch.empty / empty_like buffer pre-filled with NaN.

    An output element that a kernel forgets to write then stays NaN and fails the NaN check.
    """
    torch.manual_seed(0)
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        if out.is_floating_point() or out.is_complex():
            out.fill_(float("nan"))
        return out

    def empty_like(*args, **kwargs):
        out = real_empty_like(*args, **kwargs)
        if out.is_floating_point() or out.is_complex():
            out.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    yield


@pytest.fixture
def nan_filled_outputs(monkeypatch):
    """Every output the native extension allocates is NaN-filled before its kernel runs
    (CRBP_FAST_DEBUG_NAN_FILL=1), so an element a kernel does not write fails assert_close.
    Test files of the extension use it for all their tests (``pytestmark``)."""
    monkeypatch.setenv("CRBP_FAST_DEBUG_NAN_FILL", "1")


@pytest.fixture(params=[1, 2], ids=["threads1", "threads2"])
def threads(request):
    """The test at 1 and at 2 torch threads (the kernels split work with at::parallel_for)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture
def full_float32():
    """No TF32 in cuDNN convolutions or in matmuls, so every engine computes the same float32
    math; restored after. (monkeypatch cannot do this: torch's backend flags are properties of
    a module object, and its undo would try to delete them.)"""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def saved_bytes(fn) -> int:
    """Bytes of the unique storages autograd saves for backward while ``fn()`` runs (the bench's
    :class:`crbp_fast.bench.memory.SavedTensorBytes`)."""
    from crbp_fast.bench.memory import SavedTensorBytes

    with SavedTensorBytes() as saved:
        fn()
    return saved.total


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float = 0.0, name: str = "") -> None:
    """Relative-RMSE check with a max-abs escape hatch, and a hard fail on NaN/inf."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values in the result"
    assert torch.isfinite(expected).all(), f"{name}: non-finite values in the reference"
    a, e = actual.double(), expected.double()
    err = (a - e).pow(2).mean().sqrt()
    scale = e.pow(2).mean().sqrt()
    max_abs = (a - e).abs().max() if a.numel() else torch.tensor(0.0)
    ok = err <= rtol * scale or max_abs <= atol
    assert ok, f"{name}: relative RMSE {float(err / scale.clamp_min(1e-300)):.3e} > {rtol:.1e} (max abs {float(max_abs):.3e})"


def shape_id(b: int, c: int, h: int, w: int, k: int) -> str:
    return f"B{b}-C{c}-H{h}-W{w}-k{k}"


CPU_ISAS = ("base", "avx2", "avx512")


def cpu_runs(isa: str) -> bool:
    """Whether the native extension runs its CPU kernels with `isa` here (False without it)."""
    try:
        from crbp_fast.hgru.native import _C
    except ImportError:
        return False
    before = _C.cpu_isa()
    try:
        _C.set_cpu_isa(isa)
    except RuntimeError:
        return False
    finally:
        _C.set_cpu_isa(before)
    return True


@contextlib.contextmanager
def cpu_isa(isa: str):
    """The native CPU kernels of `isa` inside the block, the previous instruction set after it."""
    from crbp_fast.hgru.native import _C

    before = _C.cpu_isa()
    _C.set_cpu_isa(isa)
    try:
        yield
    finally:
        _C.set_cpu_isa(before)
