"""The native extension: the hGRU passes as fused C++ (CPU) and CUDA kernels.

``crbp_fast.hgru.native._C`` is compiled from ``csrc/`` by ``pip install --no-build-isolation -e .``;
:mod:`crbp_fast.hgru.native.hgru` wraps it with the pass functions of
:mod:`crbp_fast.hgru.reference` and registers ``HGRUCell(backend="native")``. Importing this
package never needs the compiled module, so the package works without it.
"""
