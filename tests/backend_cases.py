"""Problems and checks shared by the fused-backend tests (native, triton)."""

from __future__ import annotations

import torch
from conftest import assert_close

from crbp_fast import HGRUCell
from crbp_fast.conv.engines import DIRECT
from crbp_fast.hgru import reference
from crbp_fast.hgru.backends import resolve_backend


def make_problem(shape, k, norm, *, backend, dtype, groups=None, device=torch.device("cpu"), conv="direct"):
    """A cell with every parameter perturbed away from its init (gates off saturation, norm
    affine and per-channel scalars not constant), a drive x and a positive state h."""
    b, c, hgt, wid = shape
    groups = groups or c
    cell = HGRUCell(
        c, k, norm=norm, norm_groups=groups if norm == "group" else 1, backend=backend, conv=conv,
        device=device, dtype=dtype,
    )
    with torch.no_grad():
        cell.u1_gate.bias.normal_()
        cell.u2_gate.bias.normal_()
        for param in (cell.alpha, cell.gamma, cell.kappa, cell.w, cell.mu):
            param.add_(0.2 * torch.randn_like(param))
        if norm != "none":
            for mod in cell.bn.values():
                mod.weight.copy_(1 + 0.3 * torch.randn_like(mod.weight))
                mod.bias.normal_(0, 0.3)
    x = torch.randn(shape, device=device, dtype=dtype)
    h = torch.nn.functional.softplus(torch.randn(shape, device=device, dtype=dtype))
    return cell, x, h


def reference_vjp(cell, x, h, v):
    """(F(x, h), J^T v) by autograd through the reference step."""
    h = h.detach().requires_grad_(True)
    out = reference.step(x, h, cell.params())
    (u,) = torch.autograd.grad(out, h, v)
    return out.detach(), u


def check_step_and_vjp(backend_name, linearization_type, cell, x, h, rtol, engine=DIRECT):
    """The backend's no-grad step, linearize and vjp (with the conv ``engine``) against autograd
    through the reference step (direct conv); a second VJP reuses the same factors."""
    params = cell.params()
    backend = resolve_backend(backend_name, x.device)
    v = torch.randn_like(x)
    ref_out, ref_u = reference_vjp(cell, x, h, v)
    with torch.no_grad():
        out = backend.step(params, x, h, engine)
    lin = backend.linearize(params, x, h, engine)
    assert isinstance(lin, linearization_type)
    assert_close(out, ref_out, rtol, name="step")
    assert_close(lin.state, ref_out, rtol, name="linearize state")
    assert_close(lin.vjp(v), ref_u, rtol, name="vjp")
    assert_close(lin.vjp(2 * v), 2 * ref_u, rtol, name="second vjp from the same factors")
