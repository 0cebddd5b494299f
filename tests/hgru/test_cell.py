"""HGRUCell: the step against an independent restatement of the equations, the published
checkpoint layout, initialisation, gradcheck, and the reference VJP passes against autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import assert_close

from crbp_fast import HGRUCell
from crbp_fast.hgru import reference

SHAPES = [(3, 5, 13, 11, 3), (2, 4, 9, 16, 5), (1, 6, 7, 7, 7)]
SHAPE_IDS = [f"B{b}-C{c}-H{h}-W{w}-k{k}" for b, c, h, w, k in SHAPES]


def restated_step(cell: HGRUCell, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """DESIGN section 2, written out here without calling into the package."""
    pad = cell.kernel_size // 2

    def norm(c, idx):
        if cell.norm == "none":
            return c
        bn = cell.bn[idx]
        if cell.norm == "batch":
            mean = c.mean(dim=(0, 2, 3), keepdim=True)
            var = ((c - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
            return (c - mean) / torch.sqrt(var + 1e-3) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
        g = cell.norm_groups
        b, ch, hh, ww = c.shape
        cg = c.reshape(b, g, -1)
        mean = cg.mean(dim=2, keepdim=True)
        var = ((cg - mean) ** 2).mean(dim=2, keepdim=True)
        out = ((cg - mean) / torch.sqrt(var + 1e-3)).reshape(b, ch, hh, ww)
        return out * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)

    def sp(t):
        return torch.log1p(torch.exp(-t.abs())) + t.clamp_min(0)

    def one_by_one(t, conv):
        return torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], t) + conv.bias.view(1, -1, 1, 1)

    g1 = torch.sigmoid(one_by_one(h, cell.u1_gate))
    c1 = norm(F.conv2d(h * g1, cell.w_gate_inh, padding=pad), "1")
    h1 = sp(x - sp(c1 * (cell.alpha * h + cell.mu)))
    g2 = torch.sigmoid(one_by_one(h1, cell.u2_gate))
    c2 = norm(F.conv2d(h1, cell.w_gate_exc, padding=pad), "3")
    hh = sp(cell.kappa * h1 + cell.gamma * c2 + cell.w * h1 * c2)
    return sp((1 - g2) * h + g2 * hh)


def randomize(cell: HGRUCell, scale: float = 1.0) -> HGRUCell:
    """Move every parameter off its initial value so that no term hides behind a constant."""
    with torch.no_grad():
        for p in cell.parameters():
            p.add_(scale * 0.3 * torch.randn_like(p))
    return cell


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_step_matches_restated_equations(shape, norm):
    b, c, hgt, wid, k = shape
    groups = 2 if c % 2 == 0 else 1
    cell = randomize(HGRUCell(c, k, norm=norm, backend="torch", conv="direct", norm_groups=groups))
    x, h = torch.randn(b, c, hgt, wid), torch.rand(b, c, hgt, wid)
    assert_close(cell(x, h), restated_step(cell, x, h), rtol=1e-5, name="step")


def test_step_in_eval_uses_batch_statistics():
    cell = randomize(HGRUCell(4, 3, backend="torch", conv="direct"))
    x, h = torch.randn(3, 4, 8, 9), torch.rand(3, 4, 8, 9)
    train_out = cell(x, h)
    cell.eval()
    assert_close(cell(x, h), train_out, rtol=1e-7, name="eval step")


class PublishedCell(nn.Module):
    """The published module's parameter layout (four BatchNorms, two of them unused)."""

    def __init__(self, c, k):
        super().__init__()
        self.u1_gate = nn.Conv2d(c, c, 1)
        self.u2_gate = nn.Conv2d(c, c, 1)
        self.w_gate_inh = nn.Parameter(torch.randn(c, c, k, k) * 0.1)
        self.w_gate_exc = nn.Parameter(torch.randn(c, c, k, k) * 0.1)
        for name in ("alpha", "gamma", "kappa", "w", "mu"):
            setattr(self, name, nn.Parameter(torch.rand(c, 1, 1)))
        self.bn = nn.ModuleList([nn.BatchNorm2d(c, eps=1e-3, track_running_stats=False) for _ in range(4)])
        for bn in self.bn:
            nn.init.uniform_(bn.weight, 0.05, 0.2)
            nn.init.uniform_(bn.bias, -0.1, 0.1)
        self.padding = k // 2

    def forward(self, x, h):
        g1 = torch.sigmoid(self.u1_gate(h))
        c1 = self.bn[1](F.conv2d(h * g1, self.w_gate_inh, padding=self.padding))
        h1 = F.softplus(x - F.softplus(c1 * (self.alpha * h + self.mu)))
        g2 = torch.sigmoid(self.u2_gate(h1))
        c2 = self.bn[3](F.conv2d(h1, self.w_gate_exc, padding=self.padding))
        hh = F.softplus(self.kappa * h1 + self.gamma * c2 + self.w * h1 * c2)
        return F.softplus((1 - g2) * h + g2 * hh)


def test_published_state_dict_loads_and_matches():
    published = PublishedCell(5, 5)
    state = published.state_dict()
    assert any(k.startswith("bn.0.") for k in state) and any(k.startswith("bn.2.") for k in state)
    cell = HGRUCell(5, 5, backend="torch", conv="direct")
    cell.load_state_dict(state)  # strict: only the unused bn.0/bn.2 entries may be dropped
    x, h = torch.randn(2, 5, 11, 12), torch.rand(2, 5, 11, 12)
    assert_close(cell(x, h), published(x, h), rtol=1e-6, name="published step")
    assert set(cell.state_dict()) == {k for k in state if not k.startswith(("bn.0.", "bn.2."))}


def test_state_dict_round_trips_between_norms_with_same_names():
    a = randomize(HGRUCell(4, 3, norm="group", norm_groups=2))
    b = HGRUCell(4, 3, norm="group", norm_groups=2)
    b.load_state_dict(a.state_dict())
    x, h = torch.randn(2, 4, 6, 6), torch.rand(2, 4, 6, 6)
    assert torch.equal(a(x, h), b(x, h))


@pytest.mark.parametrize("gate_bias_init", ["published", "chronos"])
def test_published_initialisation(gate_bias_init):
    cell = HGRUCell(25, 15, gate_bias_init=gate_bias_init)
    for name, value in (("alpha", 0.1), ("gamma", 1.0), ("kappa", 0.5), ("w", 0.5), ("mu", 1.0)):
        assert torch.all(getattr(cell, name) == value), name
    for idx in ("1", "3"):
        assert torch.all(cell.bn[idx].weight == 0.1) and torch.all(cell.bn[idx].bias == 0)
    b1 = cell.u1_gate.bias
    lo, hi = (1.0, 7.0) if gate_bias_init == "published" else (0.0, float(torch.log(torch.tensor(7.0))))
    assert torch.all(b1 >= lo) and torch.all(b1 <= hi)
    assert torch.equal(cell.u2_gate.bias, -b1)
    w = cell.w_gate_inh.reshape(25, -1)
    assert_close(w @ w.T, torch.eye(25), rtol=1e-5, name="orthogonal W_inh rows")


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_gradcheck_one_step_float64(norm):
    cell = randomize(HGRUCell(2, 3, norm=norm, backend="torch", conv="direct").double())
    x = torch.randn(2, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    h = torch.rand(2, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda xx, hh: cell(xx, hh), (x, h))
    base = cell.params()
    params = [t.detach().clone().requires_grad_(True) for t in (base.w_inh, base.alpha, base.u2_bias)]

    def step_in_params(w_inh, alpha, u2_bias):
        p = base._replace(w_inh=w_inh, alpha=alpha, u2_bias=u2_bias)
        return reference.step(x.detach(), h.detach(), p)

    assert torch.autograd.gradcheck(step_in_params, params)


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_reference_vjp_passes_match_autograd(norm):
    torch.set_default_dtype(torch.float64)
    try:
        cell = randomize(HGRUCell(4, 5, norm=norm, backend="torch", conv="direct", norm_groups=2))
        x, h, v = torch.randn(3, 4, 9, 7), torch.rand(3, 4, 9, 7), torch.randn(3, 4, 9, 7)
        p = cell.params()
        with torch.no_grad():
            factors = reference.linearize(x, h, p)
            u = reference.vjp(v, factors, p)
        h_in = h.clone().requires_grad_(True)
        out = reference.step(x, h_in, p)
        (expected,) = torch.autograd.grad(out, h_in, v)
        assert_close(factors.state, out.detach(), rtol=1e-12, name="linearize state")
        assert_close(u, expected, rtol=1e-11, name="vjp")
    finally:
        torch.set_default_dtype(torch.float32)


def test_cell_linearize_matches_autograd():
    cell = randomize(HGRUCell(5, 3, backend="torch", conv="direct"))
    x, h, v = torch.randn(3, 5, 13, 11), torch.rand(3, 5, 13, 11), torch.randn(3, 5, 13, 11)
    lin = cell.linearize(x, h)
    h_in = h.clone().requires_grad_(True)
    out = cell(x, h_in)
    (expected,) = torch.autograd.grad(out, h_in, v)
    assert_close(lin.state, out.detach(), rtol=1e-6, name="state")
    assert_close(lin.vjp(v), expected, rtol=1e-6, name="vjp")
    assert_close(lin.vjp(2 * v), 2 * expected, rtol=1e-6, name="vjp reused")


def test_h_none_means_zeros():
    cell = HGRUCell(3, 3)
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(cell(x), cell(x, torch.zeros_like(x)))


def test_half_precision_cells_get_the_published_orthogonal_init():
    """QR has no bfloat16 kernel: the init orthogonalises in float32 and rounds."""
    cell = HGRUCell(6, 3, dtype=torch.bfloat16)
    for weight in (cell.w_gate_inh, cell.w_gate_exc, cell.u1_gate.weight, cell.u2_gate.weight):
        assert weight.dtype == torch.bfloat16
        rows = weight.float().reshape(weight.shape[0], -1)
        assert torch.allclose(rows @ rows.T, torch.eye(6), atol=2e-2)
