"""Checks that every plane pass of the CUDA build stores its outputs: each instantiation
``plane_pass_kernel<P>`` in the PTX of csrc/cuda/hgru_cuda.cu must hold at least as many global
(or generic) stores as pass P has outputs in csrc/cpu/plane_passes.h.

nvcc 13.0 once compiled every store of these kernels away (a local-array fallback for skipped
outputs), which no CPU test can see; this runs in scripts/cuda_build_check.sh.

    python3 scripts/check_ptx_stores.py hgru_cuda.ptx csrc/cpu/plane_passes.h [csrc/cuda/hgru_cuda.cu]

It counts stores, not stores per output (a kernel that wrote one output twice and another not
at all would pass); the values are the CPU tests' job, and on a GPU the gpu tests'.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def pass_outputs(header: str) -> list[tuple[str, int]]:
    """(name, n_out) of each row of kPlanePassSpecs, in order."""
    table = header[header.index("kPlanePassSpecs[kPlanePasses] = {"):]
    return [(m.group(1), int(m.group(3))) for m in re.finditer(r'\{"(\w+)", (\d+), (\d+), (\d+), (\d+),', table)]


def kernel_stores(ptx: str) -> dict[int, int]:
    """Global and generic stores per plane_pass_kernel<P> entry of the PTX."""
    out = {}
    for m in re.finditer(r"\.entry \S*plane_pass_kernelILi(\d+)E\S*\((.*?)\n\}", ptx, re.S):
        body = m.group(2)
        out[int(m.group(1))] = len(re.findall(r"^\s+(?:@!?%p\d+ )?st\.(?:global\.)?[fub]\d+", body, re.M))
    return out


def main(argv: list[str]) -> int:
    ptx, header = Path(argv[1]).read_text(), Path(argv[2]).read_text()
    passes, stores = pass_outputs(header), kernel_stores(ptx)
    count = re.search(r"static_assert\(cpu::kPlanePasses == (\d+)", Path(argv[3]).read_text()) if len(argv) > 3 else None
    bad = []
    if not passes or len(stores) != len(passes):
        bad.append(f"{len(passes)} table rows in {argv[2]} against {len(stores)} plane_pass_kernel entries in the PTX")
    if count is not None and int(count.group(1)) != len(passes):
        bad.append(f"{len(passes)} table rows against kPlanePasses == {count.group(1)} in {argv[3]}")
    for p, (name, n_out) in enumerate(passes):
        got = stores.get(p)
        if got is None or got < n_out:
            bad.append(f"{name} (pass {p}): {got} stores for {n_out} outputs")
    print(f"[ptx-stores] {len(passes)} plane passes, stores per kernel: "
          + ", ".join(f"{n}={stores.get(p)}" for p, (n, _) in enumerate(passes)))
    if bad:
        print("[ptx-stores] FAILED: " + "; ".join(bad))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
