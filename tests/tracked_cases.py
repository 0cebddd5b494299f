"""Shared cases of the fused tracked-step passes' tests (tests/hgru/test_native_tracked.py,
tests/hgru/test_triton_tracked.py): problems at a point, fresh random maps, and closeness over
the passes' NamedTuples."""

from __future__ import annotations

import torch
from conftest import assert_close

from crbp_fast import HGRUCell
from crbp_fast.hgru import reference as R

NORMS = [("batch", 1), ("group", 3), ("none", 1)]
DTYPES = (torch.float32, torch.float64)
RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}
SMALL = (3, 6, 13, 11)


def problem(norm, groups, dtype, shape=SMALL, k=5, seed=0):
    torch.manual_seed(seed)
    cell = HGRUCell(shape[1], k, norm=norm, norm_groups=groups, dtype=dtype)
    with torch.no_grad():
        for p in cell.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x, h = torch.randn(shape, dtype=dtype), torch.rand(shape, dtype=dtype)
    return cell.params(), x, h


def close(got, want, rtol, name):
    """assert_close over tensors, tuples of them and None (which must match None)."""
    if want is None or got is None:
        assert got is None and want is None, f"{name}: {got!r} against {want!r}"
    elif isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want), name
        for i, (g, w) in enumerate(zip(got, want)):
            close(g, w, rtol, f"{name}[{i}]")
    else:
        assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, want.shape, got.dtype)
        assert_close(got, want, rtol, name=name)


def close_fields(got, want, rtol, prefix):
    for field in type(want)._fields:
        close(getattr(got, field), getattr(want, field), rtol, f"{prefix}.{field}")


def random_like(nt, like, scale=1.0):
    """A NamedTuple of fresh random maps shaped like ``nt``'s tensors (None stays None; the
    per-plane statistics stay as they are: an invstd must be positive)."""
    out = []
    for v in nt:
        if isinstance(v, torch.Tensor) and v.shape == like.shape:
            out.append(scale * torch.randn_like(v))
        else:
            out.append(v)
    return type(nt)(*out)


def point(norm, groups, dtype, shape=SMALL):
    """Consistent factors and maps at a point (so the statistics are real ones), then fresh
    random tangent inputs."""
    p, x, h = problem(norm, groups, dtype, shape)
    with torch.no_grad():
        f, t = R.linearize_tracked(x, h, p)
        _, m = R.column_sums(f, p)
    return p, x, h, f, t, m


def check_each_tangent_pass(passes, p, x, f, t, m, rtol):
    """Each of the LCP tangent's five passes of ``passes`` (a fused backend's module) against the
    reference's, on fresh random maps everywhere the passes read (every term exercised) and the
    real statistics of the point, with and without the optional inputs."""
    f, t, m = random_like(f, x), random_like(t, x), random_like(m, x)
    w, v = torch.rand_like(x), torch.randn_like(x)
    with torch.no_grad():
        close(passes.tangent_gate_inh(w, f, t, p), R.tangent_gate_inh(w, f, t, p), rtol, "tangent_gate_inh")
        c1_raw_t = torch.randn_like(x)
        it, it_n = R.tangent_inhibit(c1_raw_t, w, f, t, p), passes.tangent_inhibit(c1_raw_t, w, f, t, p)
        close_fields(it_n, it, rtol, "tangent_inhibit")
        c2_raw_t = torch.randn_like(x)
        for seed in (v, None):
            et = R.tangent_excite_mix(c2_raw_t, w, it, f, t, m, p, seed)
            close_fields(passes.tangent_excite_mix(c2_raw_t, w, it, f, t, m, p, seed), et, rtol, "tangent_excite_mix")
        dh1_t, dh_t, extra = torch.randn_like(x), torch.randn_like(x), torch.randn_like(x)
        for e in (extra, None):
            vt = R.tangent_vjp_inhibit(dh1_t, dh_t, w, it, f, t, m, p, e)
            close_fields(passes.tangent_vjp_inhibit(dh1_t, dh_t, w, it, f, t, m, p, e), vt, rtol,
                         "tangent_vjp_inhibit")
        dhg_t, g1_t = torch.randn_like(x), torch.randn_like(x)
        close(passes.tangent_vjp_gate_inh(dhg_t, dh_t, w, g1_t, f, t, m, p),
              R.tangent_vjp_gate_inh(dhg_t, dh_t, w, g1_t, f, t, m, p), rtol, "tangent_vjp_gate_inh")
