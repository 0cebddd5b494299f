"""Find the CUDA toolkit that the native extension's CUDA part is built with, and check it.

    python3 scripts/cuda_home.py          # prints the toolkit found, or every candidate and why not

torch's own guess of ``CUDA_HOME`` is the folder above the ``nvcc`` on PATH; where that ``nvcc``
is a wrapper script (``/usr/local/bin/nvcc`` running ``/usr/local/cuda-13.0/bin/nvcc``) the guess
is ``/usr/local`` and the link fails with ``cannot find -lcudart``. Here the candidates are, in
order: ``$CUDA_HOME``, ``$CUDA_PATH``, the folder that ``nvcc`` itself reports (its ``--dryrun``
output names its real ``TOP``), the folder above the resolved ``nvcc`` path, then the usual
install prefixes. A candidate counts only when it has ``bin/nvcc``, ``cuda_runtime.h`` and a
linkable ``libcudart.so``; pip-style toolkits that ship only ``libcudart.so.<major>`` get a
link-time shim (a folder holding the unversioned symlink) inside the build tree.

No torch import: ``setup.py`` calls :func:`find_toolkit` before torch's build helpers read
``CUDA_HOME``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

PREFIXES = ("/usr/local/cuda", "/opt/cuda", "/usr/lib/cuda")
_TARGET_DIRS = ("targets/x86_64-linux", "targets/sbsa-linux")
_LIB_DIRS = ("lib64", "lib", *(f"{t}/lib" for t in _TARGET_DIRS))
_INCLUDE_DIRS = ("include", *(f"{t}/include" for t in _TARGET_DIRS))


class ToolkitNotFound(RuntimeError):
    """No usable CUDA toolkit; the message lists every candidate and what it lacked."""


@dataclass(frozen=True)
class Toolkit:
    home: Path  # what CUDA_HOME must be set to
    nvcc: Path
    include_dir: Path  # holds cuda_runtime.h
    lib_dir: Path  # holds libcudart.so (maybe only versioned; see link_dirs)
    found_by: str  # which candidate rule found it
    link_dirs: tuple[Path, ...] = field(default=())  # extra -L folders (the shim), if any

    def describe(self) -> str:
        extra = f", link shim {self.link_dirs[0]}" if self.link_dirs else ""
        return (f"CUDA_HOME={self.home} (from {self.found_by}): nvcc {self.nvcc}, "
                f"cuda_runtime.h in {self.include_dir}, libcudart in {self.lib_dir}{extra}")


def _nvcc_reported_top(nvcc: str) -> Path | None:
    """The toolkit root that ``nvcc --dryrun`` reports (``#$ TOP=...``), through any wrapper."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.cu"
        src.write_text("int main() { return 0; }\n")
        try:
            proc = subprocess.run([nvcc, "--dryrun", "-c", str(src), "-o", str(Path(tmp) / "probe.o")],
                                  capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
    text = proc.stdout + proc.stderr
    for name in ("TOP", "_HERE_"):
        match = re.search(rf"^#\$ {name}=(.+)$", text, flags=re.MULTILINE)
        if match:
            path = Path(match.group(1).strip().strip('"'))
            return (path if name == "TOP" else path.parent).resolve()
    return None


def candidates(env: dict[str, str] | None = None) -> list[tuple[str, Path]]:
    """(rule, folder) pairs in the order they are tried, without duplicates."""
    env = os.environ if env is None else env
    found: list[tuple[str, Path]] = []
    for name in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(name):
            found.append((f"${name}", Path(env[name])))
    nvcc = shutil.which("nvcc", path=env.get("PATH"))
    if nvcc:
        top = _nvcc_reported_top(nvcc)
        if top is not None:
            found.append((f"nvcc --dryrun ({nvcc})", top))
        found.append((f"resolved nvcc path ({nvcc})", Path(os.path.realpath(nvcc)).parent.parent))
    found += [("install prefix", Path(p)) for p in PREFIXES]
    seen, unique = set(), []
    for rule, path in found:
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            unique.append((rule, path))
    return unique


def check(home: Path, found_by: str, shim_dir: Path | None = None) -> Toolkit:
    """The toolkit at ``home``, or ``ToolkitNotFound`` saying what is missing there."""
    home = Path(home).resolve()
    missing = []
    nvcc = home / "bin" / "nvcc"
    if not nvcc.is_file():
        missing.append("bin/nvcc")
    include = next((home / d for d in _INCLUDE_DIRS if (home / d / "cuda_runtime.h").is_file()), None)
    if include is None:
        missing.append("include/cuda_runtime.h")
    lib = next((home / d for d in _LIB_DIRS if (home / d / "libcudart.so").exists()), None)
    link_dirs: tuple[Path, ...] = ()
    if lib is None:
        versioned = sorted(p for d in _LIB_DIRS for p in (home / d).glob("libcudart.so.*") if p.is_file())
        if versioned and shim_dir is not None:
            lib = versioned[-1].parent
            shim_dir.mkdir(parents=True, exist_ok=True)
            link = shim_dir / "libcudart.so"
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(versioned[-1])
            link_dirs = (shim_dir,)
        else:
            missing.append("lib64/libcudart.so" + (" (only a versioned libcudart.so.N)" if versioned else ""))
    if missing:
        raise ToolkitNotFound(f"{home} ({found_by}): no {', '.join(missing)}")
    return Toolkit(home=home, nvcc=nvcc, include_dir=include, lib_dir=lib, found_by=found_by,
                   link_dirs=link_dirs)


def find_toolkit(env: dict[str, str] | None = None, shim_dir: Path | None = None) -> Toolkit:
    """The first usable candidate; ``ToolkitNotFound`` lists every candidate and why it failed.

    An explicit ``$CUDA_HOME`` that fails the checks is an error even when another candidate would
    pass: the user asked for that toolkit.
    """
    reasons = []
    for rule, home in candidates(env):
        try:
            return check(home, rule, shim_dir)
        except ToolkitNotFound as err:
            if rule == "$CUDA_HOME":
                raise ToolkitNotFound(f"CUDA_HOME is set but unusable: {err}") from None
            reasons.append(str(err))
    tried = "\n  ".join(reasons) or "(no CUDA_HOME, no CUDA_PATH, no nvcc on PATH, no install prefix)"
    raise ToolkitNotFound(f"no usable CUDA toolkit; tried:\n  {tried}")


def main() -> int:
    try:
        toolkit = find_toolkit(shim_dir=Path("build") / "cuda-link-shim")
    except ToolkitNotFound as err:
        print(f"cuda_home: {err}", file=sys.stderr)
        return 1
    print(toolkit.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
