"""Build and install crbp_fast.

    pip install --no-build-isolation -e .

``--no-build-isolation`` builds against the torch already installed (an isolated build
environment would fetch another torch).

The native extension ``crbp_fast.native._C`` (csrc/) is built with torch.utils.cpp_extension and
ninja: the C++ CPU kernels always, the CUDA kernels when the installed torch has CUDA and nvcc is
found. Environment switches:

- ``CRBP_FAST_NO_EXT=1``: no extension (``backend="native"`` then says how to build it);
- ``CRBP_FAST_CUDA=0`` / ``=1``: skip / require the CUDA kernels (default: build them when
  possible); ``TORCH_CUDA_ARCH_LIST`` (e.g. ``9.0``) picks the GPU architectures;
- ``MAX_JOBS``: parallel compile jobs.

A failed build of the optional extension leaves a warning and a working pure-PyTorch package;
with ``CRBP_FAST_CUDA=1`` a failure is an error.
"""

import os
import sys

from setuptools import find_packages, setup


def _native_extension() -> tuple[list, dict]:
    if os.environ.get("CRBP_FAST_NO_EXT") == "1":
        return [], {}
    cuda_switch = os.environ.get("CRBP_FAST_CUDA", "")
    if cuda_switch not in ("", "0", "1"):
        raise RuntimeError(f"CRBP_FAST_CUDA: expected 0, 1 or unset, got {cuda_switch!r}")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as err:  # torch is a build requirement only of the optional extension
        print(f"crbp_fast: not building the native extension ({err})", file=sys.stderr)
        return [], {}

    cuda_possible = torch.version.cuda is not None and CUDA_HOME is not None
    if cuda_switch == "1" and not cuda_possible:
        raise RuntimeError(
            "CRBP_FAST_CUDA=1 but the CUDA kernels cannot be built: "
            f"torch {torch.__version__} has CUDA {torch.version.cuda}, nvcc found at {CUDA_HOME}"
        )
    with_cuda = cuda_possible and cuda_switch != "0"

    sources = ["csrc/bindings.cpp", "csrc/ops.cpp", "csrc/cpu/hgru_cpu.cpp", "csrc/cpu/kernels_base.cpp",
               "csrc/cpu/kernels_avx2.cpp"]
    # -fno-trapping-math lets GCC if-convert (and so vectorise) the selects of the branch-free
    # exp / log1p; -ffp-contract=fast lets it use FMA. -fopenmp makes at::parallel_for parallel
    # (its OpenMP body is compiled into the extension) and enables `#pragma omp simd`. -g0
    # overrides the -g of Python's CFLAGS: debug info of the torch headers costs a third of the
    # build time and most of the library's size.
    cxx_flags = ["-O3", "-g0", "-fopenmp", "-fno-trapping-math", "-ffp-contract=fast"]
    extra = {"extra_compile_args": {"cxx": cxx_flags}, "extra_link_args": ["-fopenmp"]}
    if with_cuda:
        sources.append("csrc/cuda/hgru_cuda.cu")
        extra["extra_compile_args"]["cxx"] = cxx_flags + ["-DCRBP_WITH_CUDA"]
        extra["extra_compile_args"]["nvcc"] = ["-O3", "-DCRBP_WITH_CUDA", "-lineinfo"]
        ext = CUDAExtension("crbp_fast.native._C", sources, **extra)
    else:
        ext = CppExtension("crbp_fast.native._C", sources, **extra)
    ext.optional = not (with_cuda and cuda_switch == "1")

    class BuildNative(BuildExtension):
        """BuildExtension (ninja) that turns a failed optional build into a warning."""

        def run(self):
            try:
                super().run()
            except Exception as err:  # noqa: BLE001 - any compiler or toolchain failure
                if not ext.optional:
                    raise
                print(
                    f"WARNING: crbp_fast: the native extension failed to build ({err!r}); the package works "
                    "without it (backend='native' is unavailable)", file=sys.stderr,
                )

    return [ext], {"build_ext": BuildNative.with_options(use_ninja=True)}


ext_modules, cmdclass = _native_extension()

setup(
    name="crbp_fast",
    version="0.1.0",
    description="Fused kernels and a fixed-point engine for recurrent vision models trained with C-RBP",
    packages=find_packages(include=["crbp_fast", "crbp_fast.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "scipy", "matplotlib", "tqdm"],
    extras_require={"triton": ["triton"], "test": ["pytest", "pytest-benchmark"]},
    entry_points={"console_scripts": ["crbp-fast=crbp_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
