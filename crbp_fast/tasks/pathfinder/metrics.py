"""Binary segmentation / classification metrics from pooled confusion counts."""

from __future__ import annotations

import torch
from torch import Tensor

METRICS = ("iou", "f1", "balanced_accuracy", "accuracy")


def confusion(pred: Tensor, target: Tensor) -> Tensor:
    """Counts (tp, fp, fn, tn) of binary predictions against targets, int64 tensor of 4.

    ``pred`` and ``target`` hold 0/1 of the same shape (pixels or samples). Counts from
    several batches (or DDP ranks) add up.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred: expected the shape of target {tuple(target.shape)}, got {tuple(pred.shape)}")
    p, t = pred.bool(), target.bool()
    return torch.stack([(p & t).sum(), (p & ~t).sum(), (~p & t).sum(), (~p & ~t).sum()]).to(torch.int64)


def scores(counts: Tensor) -> dict[str, float]:
    """IoU, F1, balanced accuracy and accuracy of the positive class from pooled (tp, fp, fn, tn).

    Pooled over all pixels (or samples) counted; a ratio with an empty denominator is 0 (IoU,
    F1) or left out of the balanced mean.
    """
    tp, fp, fn, tn = (float(c) for c in counts.tolist())

    def ratio(a: float, b: float) -> float:
        return a / b if b > 0 else 0.0

    rates = [ratio(tp, tp + fn)] if tp + fn > 0 else []
    rates += [ratio(tn, tn + fp)] if tn + fp > 0 else []
    return {
        "iou": ratio(tp, tp + fp + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "balanced_accuracy": sum(rates) / len(rates) if rates else 0.0,
        "accuracy": ratio(tp + tn, tp + fp + fn + tn),
    }
