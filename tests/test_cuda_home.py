"""scripts/cuda_home.py: the CUDA toolkit is found from nvcc's real location and checked before a build.

Fake toolkit trees stand in for the layouts seen on GPU images: nvcc behind a wrapper script in
another prefix, a pip-style toolkit with only a versioned libcudart, a prefix without headers.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("cuda_home", Path(__file__).parents[1] / "scripts" / "cuda_home.py")
cuda_home = importlib.util.module_from_spec(_SPEC)
sys.modules["cuda_home"] = cuda_home
_SPEC.loader.exec_module(cuda_home)


def fake_toolkit(root: Path, lib: str = "lib64", cudart: str = "libcudart.so", header: bool = True) -> Path:
    """A toolkit tree whose bin/nvcc answers --dryrun with its TOP, as the real one does."""
    (root / "bin").mkdir(parents=True)
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f'#!/bin/sh\necho "#\\$ _HERE_={root}/bin" >&2\necho "#\\$ TOP={root}/bin/.." >&2\n')
    nvcc.chmod(0o755)
    if header:
        (root / "include").mkdir()
        (root / "include" / "cuda_runtime.h").write_text("")
    (root / lib).mkdir()
    (root / lib / cudart).write_text("")
    return root


def wrapper_bin(folder: Path, target: Path) -> Path:
    """A /usr/local/bin-style folder whose nvcc is a script that execs the real one."""
    folder.mkdir(parents=True)
    nvcc = folder / "nvcc"
    nvcc.write_text(f'#!/bin/sh\nexec {target / "bin" / "nvcc"} "$@"\n')
    nvcc.chmod(0o755)
    return folder


@pytest.fixture(autouse=True)
def _no_system_prefixes(monkeypatch):
    """Only the fake trees count, whatever toolkit this machine has."""
    monkeypatch.setattr(cuda_home, "PREFIXES", ())


def test_wrapper_nvcc_resolves_to_the_real_toolkit(tmp_path):
    real = fake_toolkit(tmp_path / "cuda-13.0")
    bin_dir = wrapper_bin(tmp_path / "usr" / "local" / "bin", real)
    found = cuda_home.find_toolkit({"PATH": str(bin_dir)})
    assert found.home == real.resolve() and found.found_by.startswith("nvcc --dryrun")
    assert found.include_dir == real.resolve() / "include" and found.lib_dir == real.resolve() / "lib64"
    assert found.link_dirs == ()


def test_symlinked_nvcc_resolves_through_the_link(tmp_path):
    real = fake_toolkit(tmp_path / "cuda", lib="lib")
    (real / "bin" / "nvcc").write_text("#!/bin/sh\nexit 1\n")  # no --dryrun answer: the link is all there is
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvcc").symlink_to(real / "bin" / "nvcc")
    found = cuda_home.find_toolkit({"PATH": str(bin_dir)})
    assert found.home == real.resolve() and found.found_by.startswith("resolved nvcc path")
    assert found.lib_dir == real.resolve() / "lib"


def test_versioned_libcudart_only_gets_a_link_shim(tmp_path):
    real = fake_toolkit(tmp_path / "nvidia" / "cu13", lib="lib", cudart="libcudart.so.13")
    shim = tmp_path / "build" / "shim"
    found = cuda_home.find_toolkit({"CUDA_HOME": str(real), "PATH": ""}, shim_dir=shim)
    assert found.link_dirs == (shim,)
    assert (shim / "libcudart.so").resolve() == (real / "lib" / "libcudart.so.13").resolve()
    # without a place for the shim, the same tree is refused, saying why
    with pytest.raises(cuda_home.ToolkitNotFound, match="only a versioned libcudart"):
        cuda_home.find_toolkit({"CUDA_HOME": str(real), "PATH": ""})


def test_an_unusable_cuda_home_is_an_error_naming_what_is_missing(tmp_path):
    bad = fake_toolkit(tmp_path / "broken", header=False)
    good = fake_toolkit(tmp_path / "good")
    with pytest.raises(cuda_home.ToolkitNotFound, match=r"CUDA_HOME is set but unusable: .*include/cuda_runtime.h"):
        cuda_home.find_toolkit({"CUDA_HOME": str(bad), "PATH": str(good / "bin")})


def test_nothing_usable_lists_every_candidate(tmp_path):
    prefix = tmp_path / "usr" / "local"  # nvcc's parent is a prefix without a toolkit in it
    (prefix / "bin").mkdir(parents=True)
    shutil.copy(fake_toolkit(tmp_path / "t", header=False) / "bin" / "nvcc", prefix / "bin" / "nvcc")
    with pytest.raises(cuda_home.ToolkitNotFound) as info:
        cuda_home.find_toolkit({"CUDA_PATH": str(tmp_path / "missing"), "PATH": str(prefix / "bin")})
    message = str(info.value)
    assert "$CUDA_PATH" in message and "nvcc" in message and "libcudart" in message


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine")
def test_this_machines_nvcc_gives_a_checked_toolkit():
    found = cuda_home.find_toolkit(dict(os.environ, CUDA_HOME="", CUDA_PATH=""))
    assert (found.include_dir / "cuda_runtime.h").is_file() and found.home.is_dir()
