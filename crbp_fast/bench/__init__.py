"""Benchmark suite and memory profiler: what C-RBP costs against BPTT (``crbp-fast bench``).

- :mod:`.setups`: the cell, inputs and timed closures, shared with ``benchmarks/``;
- :mod:`.memory`: saved-for-backward bytes, child-process peak RSS, CUDA peak allocation;
- :mod:`.speed`: step, adjoint VJP and training iteration timings;
- :mod:`.records`: the validated JSON-lines rows and where they go;
- :mod:`.plot`: PNGs and Markdown tables from stored rows;
- :mod:`.cli`: the ``crbp-fast bench`` command.
"""
