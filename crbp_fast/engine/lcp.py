"""The Lipschitz Coefficient Penalty (LCP) that keeps a recurrent cell contractive."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .state import check_output, state_spec


def lcp_from_step(
    out: Tensor | Sequence[Tensor], h_in: Tensor | Sequence[Tensor], target: float, create_graph: bool,
) -> Tensor:
    """mean(relu(1^T J - target)^2) for a tracked step ``out = F(x, h_in)``, J = d out / d h_in.

    ``1^T J`` is the VJP of an all-ones vector: the column sums of J, one per unit of h_in.
    For a structured state, ``out`` and ``h_in`` are the lists of its tensors: J is the Jacobian
    of all output tensors with respect to all input tensors, the column sums run over every
    output unit, and the mean over every input unit (a unit that no output depends on has
    column sum 0). With ``create_graph`` the penalty is differentiable (double backward) in every
    parameter and input of the step.
    """
    if isinstance(out, Tensor) and isinstance(h_in, Tensor):
        (col_sums,) = torch.autograd.grad(out, h_in, torch.ones_like(out), create_graph=create_graph,
                                          retain_graph=True)
        return torch.relu(col_sums - target).pow(2).mean()
    outs = [out] if isinstance(out, Tensor) else list(out)
    ins = [h_in] if isinstance(h_in, Tensor) else list(h_in)
    tracked = [o for o in outs if o.requires_grad]
    sums = torch.autograd.grad(tracked, ins, [torch.ones_like(o) for o in tracked], create_graph=create_graph,
                               retain_graph=True, allow_unused=True)
    total = sum(torch.relu(c - target).pow(2).sum() if c is not None else torch.relu(torch.zeros_like(v) - target)
                .pow(2).sum() for c, v in zip(sums, ins))
    return total / sum(v.numel() for v in ins)


def lcp_penalty(f: nn.Module, x: Tensor, h, target: float = 0.9) -> Tensor:
    """Lipschitz Coefficient Penalty of the step ``f`` at (x, h).

    penalty = mean(relu(1^T J - target)^2), J = dF/dh at (x, h), 1^T J the column sums of J
    (computed as one VJP, never forming J). Differentiable in the parameters of ``f`` and in
    ``x`` when gradients are enabled; ``h`` is treated as a constant point.

    Args:
        f: any module ``f(x, h) -> h``.
        x: the drive, passed to ``f`` as is.
        h: the point at which J is taken (detached): a tensor, or a structured state (tuple /
            list / dict of tensors, e.g. a ConvLSTM's ``(h, c)``), for which J spans all of its
            tensors (see :func:`lcp_from_step`).
        target: lambda, the column-sum bound above which the penalty grows (0.9 as published).

    Returns:
        A scalar tensor.

    Example:
        >>> loss = task_loss + 10 * lcp_penalty(cell, x, h_star)
    """
    if isinstance(h, Tensor):
        if not h.is_floating_point():
            raise TypeError(f"h: expected a floating torch.Tensor, got {h.dtype}")
        spec = None
    else:
        leaves, spec = state_spec("h", h, "a floating torch.Tensor, or a (nested) tuple / list / dict of floating "
                                          "tensors with one batch size, dtype and device")
    try:
        target = float(target)
    except (TypeError, ValueError):
        raise TypeError(f"target: expected a number, got {target!r}") from None
    if not (math.isfinite(target) and target >= 0):
        raise ValueError(f"target: expected a finite number >= 0 (a bound on the column sums of J), got {target!r}")
    differentiable = torch.is_grad_enabled()
    with torch.enable_grad():
        if spec is None:
            h_in = h.detach().requires_grad_(True)
            out = f(x, h_in)
        else:
            h_in = [v.detach().requires_grad_(True) for v in leaves]
            out = check_output(f(x, spec.unflatten(h_in)), spec)
        penalty = lcp_from_step(out, h_in, target, create_graph=differentiable)
    return penalty if differentiable else penalty.detach()
