"""pytest-benchmark suites of the single operations: the hGRU step, its adjoint VJP, the conv engines.

Every concrete backend and conv engine is tried; one that cannot run here is skipped with the
reason. Run with ``pytest benchmarks/ --benchmark-only`` (options in ``conftest.py``).
"""

from __future__ import annotations

import pytest

from crbp_fast.bench.setups import (
    SWEEP_BACKENDS, SWEEP_CONVS, Unavailable, conv_fn, make_cell, make_inputs, runnable_engines, step_fn, vjp_fn,
)

PAIRS = [(b, c) for b in SWEEP_BACKENDS for c in SWEEP_CONVS]


def _cell_and_input(backend, conv, shape, device):
    try:
        runnable_engines(backend, conv, shape, device)
    except Unavailable as err:
        pytest.skip(str(err))
    return make_cell(shape, backend, conv, device), make_inputs(shape, device)


@pytest.mark.benchmark(group="hgru step (no grad)")
@pytest.mark.parametrize(("backend", "conv"), PAIRS, ids=[f"{b}-{c}" for b, c in PAIRS])
def test_step(timed, backend, conv, bench_shape, bench_device):
    cell, x = _cell_and_input(backend, conv, bench_shape, bench_device)
    timed(step_fn(cell, x), backend=backend, conv=conv)


@pytest.mark.benchmark(group="hgru adjoint VJP (linearize once)")
@pytest.mark.parametrize(("backend", "conv"), PAIRS, ids=[f"{b}-{c}" for b, c in PAIRS])
def test_vjp(timed, backend, conv, bench_shape, bench_device):
    cell, x = _cell_and_input(backend, conv, bench_shape, bench_device)
    timed(vjp_fn(cell, x), backend=backend, conv=conv)


@pytest.mark.benchmark(group="conv engine")
@pytest.mark.parametrize("transpose", [False, True], ids=["conv", "conv_transpose"])
@pytest.mark.parametrize("conv", SWEEP_CONVS)
def test_conv_engine(timed, conv, transpose, bench_shape, bench_device):
    try:
        fn = conv_fn(bench_shape, conv, bench_device, transpose=transpose)
    except Unavailable as err:
        pytest.skip(str(err))
    timed(fn, conv=conv, transpose=transpose)
