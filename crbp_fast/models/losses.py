"""The focal loss of the Pathfinder segmentation readout (and of classification)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def focal_loss(logits: Tensor, target: Tensor, gamma: float = 2.0) -> Tensor:
    """Mean focal loss ``-(1 - p_t)^gamma log p_t`` over every pixel (or sample).

    Args:
        logits: (B, K, H, W) per-pixel class logits, or (B, K) per-sample logits.
        target: int64 class indices, (B, H, W) or (B,).
        gamma: focusing exponent (2 as published; 0 gives cross-entropy).

    Returns:
        A scalar tensor.

    Example:
        >>> loss = focal_loss(model(images).logits, masks, gamma=2.0)
    """
    if logits.dim() < 2 or target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"target: expected shape {tuple(logits.shape[:1] + logits.shape[2:])} for logits of shape "
            f"{tuple(logits.shape)}, got {tuple(target.shape)}"
        )
    if target.dtype.is_floating_point:
        raise TypeError(f"target: expected integer class indices, got {target.dtype}")
    if gamma < 0:
        raise ValueError(f"gamma: expected a number >= 0, got {gamma!r}")
    logp = F.log_softmax(logits.float(), dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
    return (-((1.0 - logp.exp()) ** gamma) * logp).mean()
