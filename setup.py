"""Build and install crbp_fast.

    pip install --no-build-isolation -e .

``--no-build-isolation`` builds against the torch already installed (an isolated build
environment would fetch another torch).

The native extension ``crbp_fast.hgru.native._C`` (csrc/) is built with torch.utils.cpp_extension and
ninja: the C++ CPU kernels always, the CUDA kernels when the installed torch has CUDA and nvcc is
found. Environment switches:

- ``CRBP_FAST_NO_EXT=1``: no extension (``backend="native"`` then says how to build it);
- ``CRBP_FAST_CUDA=0`` / ``=1``: skip / require the CUDA kernels (default: build them when
  possible); ``TORCH_CUDA_ARCH_LIST`` (e.g. ``9.0``) picks the GPU architectures;
- ``CUDA_HOME``: the toolkit; unset, ``scripts/cuda_home.py`` finds it from nvcc's real location
  and checks ``cuda_runtime.h`` and ``libcudart.so`` before anything is compiled;
- ``MAX_JOBS``: parallel compile jobs.

A failed build of the optional extension leaves a warning and a working pure-PyTorch package;
with ``CRBP_FAST_CUDA=1`` a failure is an error. Without write access to site-packages (the GPU
image), build in place and put the checkout on the path:

    python3 setup.py build_ext --inplace && export PYTHONPATH=$PWD
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup


def _load_script(name: str):
    """A helper module from scripts/ (no package import: the package is what is being built)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def _native_extension() -> tuple[list, dict]:
    if os.environ.get("CRBP_FAST_NO_EXT") == "1":
        return [], {}
    cuda_switch = os.environ.get("CRBP_FAST_CUDA", "")
    if cuda_switch not in ("", "0", "1"):
        raise RuntimeError(f"CRBP_FAST_CUDA: expected 0, 1 or unset, got {cuda_switch!r}")
    try:
        import torch
    except ImportError as err:  # torch is a build requirement only of the optional extension
        print(f"crbp_fast: not building the native extension ({err})", file=sys.stderr)
        return [], {}

    toolkit, why_not = None, f"torch {torch.__version__} is a build without CUDA"
    if torch.version.cuda is not None and cuda_switch != "0":
        # Found and checked before torch's build helpers are imported: they read CUDA_HOME once,
        # at import, and would otherwise guess it from the nvcc on PATH (wrong behind a wrapper).
        cuda_home = _load_script("cuda_home")
        try:
            toolkit = cuda_home.find_toolkit(shim_dir=Path(__file__).parent / "build" / "cuda-link-shim")
            os.environ["CUDA_HOME"] = str(toolkit.home)
            print(f"crbp_fast: {toolkit.describe()}", file=sys.stderr)
        except cuda_home.ToolkitNotFound as err:
            why_not = str(err)
    if cuda_switch == "1" and toolkit is None:
        raise RuntimeError(f"CRBP_FAST_CUDA=1 but the CUDA kernels cannot be built: {why_not}")
    if toolkit is None and cuda_switch != "0" and torch.version.cuda is not None:
        print(f"WARNING: crbp_fast: building the C++ kernels only, without CUDA: {why_not}", file=sys.stderr)
    with_cuda = toolkit is not None

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = ["csrc/bindings.cpp", "csrc/ops.cpp", "csrc/cpu/hgru_cpu.cpp", "csrc/cpu/kernels_base.cpp",
               "csrc/cpu/kernels_avx2.cpp", "csrc/cpu/kernels_avx512.cpp"]
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
        extra["library_dirs"] = [str(d) for d in (*toolkit.link_dirs, toolkit.lib_dir)]
        ext = CUDAExtension("crbp_fast.hgru.native._C", sources, **extra)
    else:
        ext = CppExtension("crbp_fast.hgru.native._C", sources, **extra)
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
