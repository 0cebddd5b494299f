"""PathfinderHGRU against the published Pathfinder code: focal loss, adjoint options, conv0 bank, checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from crbp_fast.models import focal_loss


def published_focal(logits: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    """The published FocalLoss restated: flatten to (pixels, K), p_t from the data, mean."""
    z = logits.flatten(2).transpose(1, 2).reshape(-1, logits.shape[1]) if logits.dim() > 2 else logits
    logpt = F.log_softmax(z, dim=1).gather(1, target.reshape(-1, 1)).view(-1)
    pt = logpt.detach().exp()
    return (-1 * (1 - pt) ** gamma * logpt).mean()


def logits_and_target(shape=(3, 2, 5, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    target = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=g)
    return logits, target


def grad_of(loss_fn, logits):
    (g,) = torch.autograd.grad(loss_fn(logits), logits)
    return g


@pytest.mark.parametrize("shape", [(3, 2, 5, 4), (6, 2), (2, 3, 4, 4)], ids=["seg", "cls", "K3"])
@pytest.mark.parametrize("gamma", [2.0, 0.5])
def test_focal_published_gradient_treats_p_t_as_constant(shape, gamma):
    logits, target = logits_and_target(shape)
    value = focal_loss(logits, target, gamma)
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, published_focal(logits, target, gamma), rtol=1e-14, atol=0)
    g = grad_of(lambda z: focal_loss(z, target, gamma), logits)
    torch.testing.assert_close(g, grad_of(lambda z: published_focal(z, target, gamma), logits), rtol=1e-13, atol=1e-16)
    # Closed form: d/dz of -(1 - p_t)^gamma log p_t with the factor constant.
    p = logits.detach().softmax(1)
    onehot = F.one_hot(target, shape[1]).movedim(-1, 1).to(p.dtype)
    pt = (p * onehot).sum(1, keepdim=True)
    expected = -((1 - pt) ** gamma) * (onehot - p) / target.numel()
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-16)


@pytest.mark.parametrize("gamma", [2.0, 1.5])
def test_focal_differentiable_variant_adds_the_factor_derivative(gamma):
    logits, target = logits_and_target()
    a = focal_loss(logits, target, gamma, variant="published")
    b = focal_loss(logits, target, gamma, variant="differentiable")
    torch.testing.assert_close(a, b, rtol=1e-15, atol=0)  # same value
    g = grad_of(lambda z: focal_loss(z, target, gamma, variant="differentiable"), logits)
    p = logits.detach().softmax(1)
    onehot = F.one_hot(target, 2).movedim(-1, 1).to(p.dtype)
    pt = (p * onehot).sum(1, keepdim=True)
    # dL/dlog p_t = gamma (1 - p_t)^(gamma - 1) p_t log p_t - (1 - p_t)^gamma; dlog p_t/dz = onehot - p.
    dl = gamma * (1 - pt) ** (gamma - 1) * pt * pt.log() - (1 - pt) ** gamma
    torch.testing.assert_close(g, dl * (onehot - p) / target.numel(), rtol=1e-12, atol=1e-16)
    g_pub = grad_of(lambda z: focal_loss(z, target, gamma), logits)
    assert (g - g_pub).norm() > 0.1 * g_pub.norm()  # the variants really differ


def test_focal_gamma_zero_is_cross_entropy_in_both_variants():
    logits, target = logits_and_target()
    ce = F.cross_entropy(logits, target)
    for variant in ("published", "differentiable"):
        torch.testing.assert_close(focal_loss(logits, target, 0.0, variant=variant), ce, rtol=1e-14, atol=0)


def test_focal_dtype_follows_the_logits():
    logits, target = logits_and_target()
    assert focal_loss(logits.float(), target).dtype == torch.float32
    assert focal_loss(logits.detach().bfloat16(), target).dtype == torch.float32  # 16-bit is promoted


@pytest.mark.parametrize("kwargs, match", [
    (dict(variant="textbook"), "variant"), (dict(gamma=-1.0), "gamma"), (dict(gamma="2"), "gamma"),
])
def test_focal_bad_arguments_are_named(kwargs, match):
    logits, target = logits_and_target()
    with pytest.raises(ValueError, match=match):
        focal_loss(logits, target, **kwargs)
