"""Panoptic quality (PQ, SQ, RQ) through torchmetrics' PanopticQuality."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.detection import PanopticQuality


class PanopticScore:
    """Accumulates (prediction, target) panoptic maps and returns PQ / SQ / RQ (as 0..100).

    Both maps are (H, W, 2) (category id, segment id); the VOID category (0) and any id that is
    neither a thing nor a stuff id is void: not scored (torchmetrics' convention).
    """

    def __init__(self, things: list[int], stuffs: list[int]):
        self.metric = PanopticQuality(things=set(things), stuffs=set(stuffs), allow_unknown_preds_category=True,
                                      return_sq_and_rq=True)
        self.images = 0

    def update(self, pred: Tensor, target: Tensor) -> None:
        if pred.shape != target.shape or pred.dim() != 3 or pred.shape[-1] != 2:
            raise ValueError(f"pred / target: expected two (H, W, 2) maps, got {tuple(pred.shape)} and "
                             f"{tuple(target.shape)}")
        self.metric.update(pred[None].cpu(), target[None].cpu())
        self.images += 1

    def compute(self) -> dict[str, float]:
        if self.images == 0:
            raise ValueError("PanopticScore.compute: no image was added")
        pq, sq, rq = (float(v) * 100 for v in self.metric.compute())
        return {"pq": pq, "sq": sq, "rq": rq}


__all__ = ["PanopticScore"]
