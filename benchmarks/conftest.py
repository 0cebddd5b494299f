"""Fixtures of the pytest-benchmark suites: shape, device and threads, from options or env vars.

    pytest benchmarks/ --benchmark-only                          # quick shape, CPU (or CUDA)
    pytest benchmarks/ --benchmark-only --bench-preset paper     # B=32, C=25, 150x150, k=15
    CRBP_BENCH_PRESET=paper CRBP_BENCH_DEVICE=cuda pytest benchmarks/ --benchmark-only

The set-up (cell, inputs, closures) is :mod:`crbp_fast.bench.setups`, shared with
``crbp-fast bench``.
"""

from __future__ import annotations

import os

import pytest
import torch

from crbp_fast.bench.setups import PRESETS, Shape, resolve_device, synchronize


def pytest_addoption(parser):
    group = parser.getgroup("crbp-fast benchmarks")
    group.addoption("--bench-preset", choices=sorted(PRESETS), default=os.environ.get("CRBP_BENCH_PRESET", "quick"),
                    help="shape preset (env CRBP_BENCH_PRESET; default quick)")
    group.addoption("--bench-device", default=os.environ.get("CRBP_BENCH_DEVICE"),
                    help="cpu, cuda or cuda:N (env CRBP_BENCH_DEVICE; default cuda when present, else cpu)")
    group.addoption("--bench-threads", type=int, default=int(os.environ.get("CRBP_BENCH_THREADS", "0")) or None,
                    help="torch.set_num_threads (env CRBP_BENCH_THREADS; default: the preset's, 1 for quick)")


@pytest.fixture(scope="session")
def bench_shape(request) -> Shape:
    return PRESETS[request.config.getoption("--bench-preset")].shape


@pytest.fixture(scope="session")
def bench_device(request) -> torch.device:
    try:
        return resolve_device(request.config.getoption("--bench-device"))
    except ValueError as err:
        raise pytest.UsageError(f"--bench-{err}") from None


@pytest.fixture(scope="session", autouse=True)
def _bench_threads(request):
    threads = request.config.getoption("--bench-threads") or PRESETS[request.config.getoption("--bench-preset")].threads
    if threads is not None:
        torch.set_num_threads(threads)


@pytest.fixture
def timed(benchmark, bench_shape, bench_device):
    """``timed(fn)``: benchmark ``fn`` (synchronised on CUDA), with the shape and device noted."""
    def run(fn, **info):
        benchmark.extra_info.update(
            shape=bench_shape.id, device=str(bench_device), threads=torch.get_num_threads(), **info,
        )

        def call():
            out = fn()
            synchronize(bench_device)
            return out

        return benchmark(call)

    return run
