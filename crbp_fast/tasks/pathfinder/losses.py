"""The focal loss of the Pathfinder segmentation readout (and of classification)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: ``"published"``: p_t is a constant in the modulating factor (1 - p_t)^gamma, as the published
#: training code computes it (from the log-probabilities' data, outside the graph);
#: ``"differentiable"``: the factor is differentiated too (the textbook focal loss).
FOCAL_VARIANTS = ("published", "differentiable")


def focal_loss(logits: Tensor, target: Tensor, gamma: float = 2.0, variant: str = "published") -> Tensor:
    """Mean focal loss ``-(1 - p_t)^gamma log p_t`` over every pixel (or sample).

    Both variants give the same value; they differ in the gradient. With ``variant="published"``
    the gradient w.r.t. the logits z is ``-(1 - p_t)^gamma (onehot - softmax(z))`` (a reweighted
    cross-entropy gradient); with ``"differentiable"`` the factor's own derivative,
    ``gamma (1 - p_t)^(gamma - 1) p_t log p_t``, is added to the derivative w.r.t. log p_t.

    The loss is computed in the logits' dtype (float32 and float64 as they are; 16-bit logits,
    e.g. under autocast, are promoted to float32, since their log-softmax is too coarse for the
    small 1 - p_t that the factor weights by).

    Args:
        logits: (B, K, H, W) per-pixel class logits, or (B, K) per-sample logits.
        target: int64 class indices, (B, H, W) or (B,).
        gamma: focusing exponent (2 as published; 0 gives cross-entropy).
        variant: ``"published"`` (default) or ``"differentiable"``, see :data:`FOCAL_VARIANTS`.

    Returns:
        A scalar tensor in the dtype of the computation.

    Example:
        >>> loss = focal_loss(model(images).logits, masks, gamma=2.0)
    """
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits: expected a floating torch.Tensor, got {getattr(logits, 'dtype', type(logits).__name__)}")
    if logits.dim() < 2 or target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"target: expected shape {tuple(logits.shape[:1] + logits.shape[2:])} for logits of shape "
            f"{tuple(logits.shape)}, got {tuple(target.shape)}"
        )
    if target.dtype.is_floating_point:
        raise TypeError(f"target: expected integer class indices, got {target.dtype}")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma >= 0:
        raise ValueError(f"gamma: expected a number >= 0, got {gamma!r}")
    if variant not in FOCAL_VARIANTS:
        raise ValueError(f"variant: expected one of {FOCAL_VARIANTS}, got {variant!r}")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logp = F.log_softmax(logits.to(dtype), dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
    p = logp.exp()
    if variant == "published":
        p = p.detach()
    return (-((1.0 - p) ** gamma) * logp).mean()
