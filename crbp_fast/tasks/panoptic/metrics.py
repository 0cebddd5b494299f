"""Panoptic quality (PQ, SQ, RQ) as COCO's panopticapi defines it, accumulated by torchmetrics'
PanopticQuality.

torchmetrics departs from panopticapi in one place: a ground-truth segment that the prediction
leaves mostly void (category 0, "no prediction") is dropped instead of counted as a false
negative, and the void-predicted part of a ground-truth segment is taken out of its area before
the IoU. An untrained model that predicts nothing then scores NaN, and one that predicts a single
segment right and abstains elsewhere scores 100. Here every void or unknown-category pixel of the
prediction is given to one extra stuff category that no ground truth has ("no prediction"), so that
torchmetrics counts what panopticapi counts (unmatched ground truth = false negative, IoU over the
whole segment), and that category is left out of the averages. Ground-truth void still masks out
predictions, as in panopticapi.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.detection import PanopticQuality

VOID = 0


class PanopticScore:
    """Accumulates (prediction, target) panoptic maps and returns PQ / SQ / RQ (as 0..100).

    Both maps are (H, W, 2) (category id, segment id). In the target, the VOID category (0) and
    any id that is neither a thing nor a stuff id is void: not scored. In the prediction such
    pixels are "no prediction" (see the module docstring). With a process group up, the counts
    of every rank are summed (torchmetrics' sync).
    """

    def __init__(self, things: list[int], stuffs: list[int]):
        self.things, self.stuffs = set(things), set(stuffs)
        if self.things & self.stuffs or VOID in self.things | self.stuffs:
            raise ValueError(f"things / stuffs: expected disjoint category ids other than {VOID}, got "
                             f"{sorted(things)} and {sorted(stuffs)}")
        self.none = max(self.things | self.stuffs) + 1  # the "no prediction" category
        self.metric = PanopticQuality(things=self.things, stuffs=self.stuffs | {self.none},
                                      allow_unknown_preds_category=True)
        self._known = torch.tensor(sorted(self.things | self.stuffs))
        self.images = 0

    def update(self, pred: Tensor, target: Tensor) -> None:
        if pred.shape != target.shape or pred.dim() != 3 or pred.shape[-1] != 2:
            raise ValueError(f"pred / target: expected two (H, W, 2) maps, got {tuple(pred.shape)} and "
                             f"{tuple(target.shape)}")
        pred = pred.cpu().clone()
        abstain = ~torch.isin(pred[..., 0], self._known)
        pred[..., 0][abstain] = self.none
        pred[..., 1][abstain] = 0
        self.metric.update(pred[None], target[None].cpu())
        self.images += 1

    def compute(self) -> dict[str, float]:
        if self.images == 0:
            raise ValueError("PanopticScore.compute: no image was added")
        m = self.metric
        with m.sync_context(should_sync=m.dist_sync_on_step is False):
            iou, tp, fp, fn = (s.double().clone() for s in (m.iou_sum, m.true_positives, m.false_positives,
                                                              m.false_negatives))
        keep = torch.tensor([cid != self.none for cid in sorted(m.cat_id_to_continuous_id,
                                                                 key=m.cat_id_to_continuous_id.get)])
        iou, tp, fp, fn = iou[keep], tp[keep], fp[keep], fn[keep]
        sq = torch.where(tp > 0, iou / tp.clamp(min=1), 0.0)
        den = tp + 0.5 * fp + 0.5 * fn
        rq = torch.where(den > 0, tp / den.clamp(min=1e-12), 0.0)
        scored = den > 0  # categories that appear in the ground truth or the prediction
        if not scored.any():
            return {"pq": float("nan"), "sq": float("nan"), "rq": float("nan")}
        return {"pq": float((sq * rq)[scored].mean()) * 100, "sq": float(sq[scored].mean()) * 100,
                "rq": float(rq[scored].mean()) * 100}


__all__ = ["PanopticScore"]
