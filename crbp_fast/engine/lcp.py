"""The Lipschitz Coefficient Penalty (LCP) that keeps a recurrent cell contractive."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor


def lcp_from_step(out: Tensor, h_in: Tensor, target: float, create_graph: bool) -> Tensor:
    """mean(relu(1^T J - target)^2) for a tracked step ``out = F(x, h_in)``, J = d out / d h_in.

    ``1^T J`` is the VJP of an all-ones vector: the column sums of J, one per unit of h_in.
    With ``create_graph`` the penalty is differentiable (double backward) in every parameter
    and input of the step.
    """
    (col_sums,) = torch.autograd.grad(out, h_in, torch.ones_like(out), create_graph=create_graph, retain_graph=True)
    return torch.relu(col_sums - target).pow(2).mean()


def lcp_penalty(f: nn.Module, x: Tensor, h: Tensor, target: float = 0.9) -> Tensor:
    """Lipschitz Coefficient Penalty of the step ``f`` at (x, h).

    penalty = mean(relu(1^T J - target)^2), J = dF/dh at (x, h), 1^T J the column sums of J
    (computed as one VJP, never forming J). Differentiable in the parameters of ``f`` and in
    ``x`` when gradients are enabled; ``h`` is treated as a constant point.

    Args:
        f: any module ``f(x, h) -> h``.
        x: the drive, passed to ``f`` as is.
        h: the point at which J is taken (detached).
        target: lambda, the column-sum bound above which the penalty grows (0.9 as published).

    Returns:
        A scalar tensor.

    Example:
        >>> loss = task_loss + 10 * lcp_penalty(cell, x, h_star)
    """
    if not isinstance(h, Tensor) or not h.is_floating_point():
        raise TypeError(f"h: expected a floating torch.Tensor, got {getattr(h, 'dtype', type(h).__name__)}")
    try:
        target = float(target)
    except (TypeError, ValueError):
        raise TypeError(f"target: expected a number, got {target!r}") from None
    if not (math.isfinite(target) and target >= 0):
        raise ValueError(f"target: expected a finite number >= 0 (a bound on the column sums of J), got {target!r}")
    differentiable = torch.is_grad_enabled()
    with torch.enable_grad():
        h_in = h.detach().requires_grad_(True)
        out = f(x, h_in)
        penalty = lcp_from_step(out, h_in, target, create_graph=differentiable)
    return penalty if differentiable else penalty.detach()
