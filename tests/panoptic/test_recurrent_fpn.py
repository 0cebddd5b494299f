"""RecurrentFPN: a drop-in for torchvision's FPN; gradients for every algorithm; memory flat for C-RBP."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from crbp_fast import ALGORITHMS
from crbp_fast.bench.memory import SavedTensorBytes
from crbp_fast.hgru import ConvHGRUCell, HGRUCell
from crbp_fast.models import RecurrentFPN

IN_CHANNELS = [8, 16, 24]


def _features(batch: int = 2, requires_grad: bool = False) -> OrderedDict:
    sizes = [(16, 20), (8, 10), (4, 5)]  # non-square, as detection batches are
    return OrderedDict(
        (f"feat{i}", torch.randn(batch, c, h, w, requires_grad=requires_grad))
        for i, (c, (h, w)) in enumerate(zip(IN_CHANNELS, sizes)))


@pytest.mark.parametrize("extra", [None, "maxpool"], ids=["no-extra", "maxpool"])
def test_same_keys_and_shapes_as_torchvision(extra):
    x = _features()
    make_extra = (lambda: LastLevelMaxPool()) if extra else (lambda: None)
    ref = FeaturePyramidNetwork(IN_CHANNELS, 16, extra_blocks=make_extra())
    fpn = RecurrentFPN(IN_CHANNELS, 16, extra_blocks=make_extra(), steps=3, algorithm="crbp")
    assert isinstance(fpn, FeaturePyramidNetwork)
    expected, got = ref(x), fpn(x)
    assert list(got) == list(expected)
    for k in expected:
        assert got[k].shape == expected[k].shape, k
        assert torch.isfinite(got[k]).all(), k


def test_output_layers_load_from_a_torchvision_state_dict():
    ref = FeaturePyramidNetwork(IN_CHANNELS, 16)
    fpn = RecurrentFPN(IN_CHANNELS, 16, steps=2)
    result = fpn.load_state_dict(ref.state_dict(), strict=False)
    # Only torchvision's 1x1 laterals have no counterpart; the 3x3 output convs load by name.
    assert sorted(result.unexpected_keys) == sorted(k for k in ref.state_dict() if k.startswith("inner_blocks."))
    for k, v in ref.state_dict().items():
        if k.startswith("layer_blocks."):
            assert torch.equal(fpn.state_dict()[k], v)
    assert all(k.startswith("inner_blocks.") for k in result.missing_keys)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_gradients_flow_for_every_algorithm(algorithm):
    x = _features(requires_grad=True)
    fpn = RecurrentFPN(IN_CHANNELS, 16, extra_blocks=LastLevelMaxPool(), steps=3, algorithm=algorithm,
                       cell_options={"backend": "torch"})
    out = fpn(x)
    loss = sum(v.square().mean() for v in out.values())
    if algorithm in ("cbptt", "crbp"):
        assert fpn.penalty is not None and fpn.penalty.dim() == 0 and fpn.penalty.requires_grad
        loss = loss + fpn.penalty
    else:
        assert fpn.penalty is None
    loss.backward()
    for name, p in fpn.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # Every recurrent parameter that the step uses receives signal (the projection and the gates).
    for i, lateral in enumerate(fpn.inner_blocks):
        assert lateral.cell.proj.weight.grad.abs().sum() > 0, f"level {i} projection"
        assert lateral.cell.step.w_gate_exc.grad.abs().sum() > 0, f"level {i} w_gate_exc"
    for k, v in x.items():
        assert v.grad is not None and v.grad.abs().sum() > 0, f"input {k}"
    assert len(fpn.level_stats) == 3
    if algorithm in ("rbp", "crbp"):
        assert all(s.adjoint_iterations == 15 for s in fpn.level_stats)  # adjoint_tol=0: all 15 products


def test_one_step_rbp_without_adjoint_products_equals_bptt():
    # N = 1 from h0 = 0 and no J^T v products: the implicit gradient is the gradient of the one
    # tracked step, which is what BPTT-1 computes; this checks the FPN's wiring of the engine
    # (drive, state, norm, top-down path), whose implicit gradients the core tests check.
    x = _features(requires_grad=True)
    grads = {}
    for algorithm in ("bptt", "rbp"):
        torch.manual_seed(2)
        fpn = RecurrentFPN(IN_CHANNELS, 16, steps=1, algorithm=algorithm, adjoint_steps=0,
                           cell_options={"backend": "torch"})
        out = fpn(x)
        x_grads = torch.autograd.grad(sum(v.square().mean() for v in out.values()),
                                      [*fpn.parameters(), *x.values()], allow_unused=True)
        grads[algorithm] = torch.cat([g.flatten() for g in x_grads if g is not None])
    assert grads["rbp"].numel() == grads["bptt"].numel()
    torch.testing.assert_close(grads["rbp"], grads["bptt"], rtol=1e-5, atol=1e-7)


def _saved_bytes(algorithm: str, steps: int) -> int:
    torch.manual_seed(0)
    x = _features(requires_grad=True)
    fpn = RecurrentFPN(IN_CHANNELS, 16, steps=steps, algorithm=algorithm, cell_options={"backend": "torch"})
    with SavedTensorBytes() as saved:
        out = fpn(x)
        loss = sum(v.square().mean() for v in out.values())
        if fpn.penalty is not None:
            loss = loss + fpn.penalty
    loss.backward()
    return saved.total


def test_crbp_saved_for_backward_is_flat_in_steps_and_bptt_grows():
    crbp = [_saved_bytes("crbp", n) for n in (2, 5, 10)]
    bptt = [_saved_bytes("bptt", n) for n in (2, 3, 5)]
    assert crbp[0] == crbp[1] == crbp[2], crbp
    assert bptt[0] < bptt[1] < bptt[2], bptt
    # Linear in N: every step past the first saves the same bytes.
    assert bptt[2] - bptt[1] == 2 * (bptt[1] - bptt[0]), bptt


def test_custom_cell_callable():
    def make(c_in: int, c_out: int) -> torch.nn.Module:
        return ConvHGRUCell(c_in, c_out, norm_groups=4, backend="torch")

    fpn = RecurrentFPN(IN_CHANNELS, 16, cell=make, steps=2)
    assert all(isinstance(l.cell.step, HGRUCell) for l in fpn.inner_blocks)
    assert fpn(_features())["feat0"].shape == (2, 16, 16, 20)


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "steps: expected an int >= 1, got 0"),
    ({"algorithm": "sgd"}, "algorithm: expected one of"),
    ({"cell": "lstm"}, "cell: expected one of ('hgru',)"),
    ({"groups": 5}, "groups: expected a positive divisor of out_channels=16, got 5"),
    ({"fixed_point_options": {"steps": 3}}, "fixed_point_options: ['steps'] are RecurrentFPN arguments"),
])
def test_errors_name_the_argument(kwargs, message):
    with pytest.raises(ValueError) as err:
        RecurrentFPN(IN_CHANNELS, 16, **kwargs)
    assert message in str(err.value)


def test_wrong_input_channels_name_the_level():
    fpn = RecurrentFPN(IN_CHANNELS, 16, steps=1)
    x = _features()
    x["feat1"] = torch.randn(2, 7, 8, 10)
    with pytest.raises(ValueError, match=r"x: expected shape \(B, 16, H, W\), got \(2, 7, 8, 10\)"):
        fpn(x)
