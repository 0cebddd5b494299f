"""Fused Triton kernels for the hGRU step and its VJP (``HGRUCell(backend="triton")``).

Importing :mod:`crbp_fast.hgru.triton.hgru` defines the kernels and registers the backend; the
cell's backend registry does that on first use. On CPU the kernels run only under triton's
interpreter, which must be chosen (``TRITON_INTERPRET=1``) before that import.
"""
