"""Panoptic FPN: the merge, PQ through torchmetrics, training losses and inference outputs."""

from __future__ import annotations

import pytest
import torch

from crbp_fast.models import RecurrentFPN
from crbp_fast.tasks.panoptic.data import VOID, CocoPanoptic, collate
from crbp_fast.tasks.panoptic.metrics import PanopticScore
from crbp_fast.tasks.panoptic.model import PanopticConfig, PanopticFPN, panoptic_merge

THINGS, STUFFS = [1, 2, 3], [4, 5]


def _detections(boxes_masks_scores_labels):
    masks = torch.stack([m.float()[None] for m, _, _ in boxes_masks_scores_labels])
    return {"masks": masks, "scores": torch.tensor([s for _, s, _ in boxes_masks_scores_labels]),
            "labels": torch.tensor([lab for _, _, lab in boxes_masks_scores_labels])}


def test_merge_orders_by_score_drops_overlaps_and_small_stuff():
    h, w = 8, 8
    a = torch.zeros(h, w, dtype=torch.bool)
    a[0:4, 0:4] = True
    b = torch.zeros(h, w, dtype=torch.bool)
    b[1:4, 1:4] = True  # 100% inside a: dropped (overlap > 0.5)
    c = torch.zeros(h, w, dtype=torch.bool)
    c[4:8, 4:8] = True
    low = torch.zeros(h, w, dtype=torch.bool)
    low[6:8, 0:2] = True  # below the score threshold
    det = _detections([(b, 0.8, 2), (a, 0.9, 1), (c, 0.7, 3), (low, 0.3, 1)])
    semantic = torch.full((h, w), 1)
    semantic[:, 6:] = 2
    pan = panoptic_merge(det, semantic, THINGS, STUFFS, stuff_area=3)
    cat, seg = pan[..., 0], pan[..., 1]
    assert (cat[a] == 1).all() and (seg[a] == seg[0, 0]).all()
    assert (cat[c] == 3).all()
    assert not (cat == 2).any()  # b was dropped
    free = ~(a | c)
    # Stuff fills the rest: class 1 -> category 4, class 2 -> category 5 (its free part has 8 px).
    assert (cat[free & (semantic == 1)] == 4).all() and (cat[free & (semantic == 2)] == 5).all()
    assert len(seg.unique()) == 4  # a, c, two stuff segments
    pan = panoptic_merge(det, semantic, THINGS, STUFFS, stuff_area=100)
    assert (pan[..., 0][free] == VOID).all()  # stuff regions below stuff_area stay void


def test_pq_is_100_for_the_target_and_lower_for_a_wrong_map(panoptic_root):
    ds = CocoPanoptic(panoptic_root, "val")
    perfect, wrong = PanopticScore(ds.things, ds.stuffs), PanopticScore(ds.things, ds.stuffs)
    for i in range(len(ds)):
        target = ds[i][1]["panoptic"]
        perfect.update(target, target)
        bad = target.clone()
        bad[..., 0][bad[..., 0] == 4] = 5  # all sky called ground
        wrong.update(bad, target)
    assert perfect.compute() == {"pq": 100.0, "sq": 100.0, "rq": 100.0}
    assert wrong.compute()["pq"] < 80


def _tiny(fpn: str = "recurrent", algorithm: str = "crbp") -> PanopticFPN:
    config = PanopticConfig(num_things=3, num_stuff=2, fpn=fpn, fpn_width=16, semantic_width=16, steps=2,
                            algorithm=algorithm, cell_backend="torch", min_size=64, max_size=64,
                            anchor_sizes=(8, 16, 32, 64, 128))
    return PanopticFPN(config, THINGS, STUFFS)


@pytest.mark.parametrize("algorithm", ["bptt", "crbp"])
def test_training_forward_losses_and_penalty(panoptic_root, algorithm):
    model = _tiny(algorithm=algorithm).train()
    assert isinstance(model.fpn, RecurrentFPN)
    images, targets = collate([CocoPanoptic(panoptic_root, "train")[i] for i in range(2)])
    out = model(images, targets)
    assert set(out.losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask",
                               "loss_semantic"}
    loss = sum(out.losses.values())
    assert (out.penalty is not None) == (algorithm == "crbp")
    if out.penalty is not None:
        loss = loss + out.penalty
    assert torch.isfinite(loss)
    loss.backward()
    assert model.fpn.inner_blocks[0].cell.proj.weight.grad.abs().sum() > 0
    assert model.semantic_head.predictor.weight.grad.abs().sum() > 0


def test_inference_outputs_panoptic_maps_at_image_size(panoptic_root):
    model = _tiny().eval()
    images = [CocoPanoptic(panoptic_root, "val")[0][0], torch.rand(3, 48, 80)]  # another size too
    with torch.no_grad():
        results = model(images).results
    for image, r in zip(images, results):
        h, w = image.shape[-2:]
        assert r["semantic"].shape == (h, w) and r["panoptic"].shape == (h, w, 2)
        assert set(r["panoptic"][..., 0].unique().tolist()) <= {VOID, *THINGS, *STUFFS}


def test_torchvision_fpn_baseline_builds():
    from torchvision.ops import FeaturePyramidNetwork

    model = _tiny(fpn="torchvision")
    assert type(model.fpn) is FeaturePyramidNetwork


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="backbone: expected one of"):
        PanopticFPN(PanopticConfig(num_things=3, num_stuff=2, backbone="vgg"), THINGS, STUFFS)
    with pytest.raises(ValueError, match="things / stuffs: expected 3 / 2 category ids, got 2 / 2"):
        PanopticFPN(PanopticConfig(num_things=3, num_stuff=2), [1, 2], STUFFS)


def _panopticapi_pq(pred: torch.Tensor, target: torch.Tensor, categories: list[int]) -> float:
    """PQ as COCO's panopticapi computes it (pq_compute_single_core + PQStat.pq_average), restated
    for one image with no crowd segments: unmatched ground truth counts as a false negative,
    prediction segments mostly on ground-truth void are not false positives, IoU over whole segments
    minus the prediction's overlap with ground-truth void."""
    def segments(m):  # category 0 and unknown categories are no segment ("no prediction" in pred)
        ids = m[..., 0] * 1000 + m[..., 1]
        return {int(s): (int(s) // 1000, ids == s) for s in ids.unique() if int(s) // 1000 in categories}
    p, g = segments(pred), segments(target)
    gt_void = target[..., 0] == 0
    stat = {c: [0.0, 0, 0, 0] for c in categories}  # iou, tp, fp, fn
    matched_p, matched_g = set(), set()
    for gl, (gc, gm) in g.items():
        for pl, (pc, pm) in p.items():
            if pc != gc:
                continue
            inter = (gm & pm).sum().item()
            union = pm.sum().item() + gm.sum().item() - inter - (pm & gt_void).sum().item()
            if union and inter / union > 0.5:
                stat[gc][0] += inter / union
                stat[gc][1] += 1
                matched_p.add(pl), matched_g.add(gl)
    for gl, (gc, _) in g.items():
        if gl not in matched_g:
            stat[gc][3] += 1
    for pl, (pc, pm) in p.items():
        if pl not in matched_p and (pm & gt_void).sum().item() / pm.sum().item() <= 0.5:
            stat[pc][2] += 1
    pqs = [s[0] / (s[1] + 0.5 * s[2] + 0.5 * s[3]) for s in stat.values() if s[1] + s[2] + s[3] > 0]
    return 100 * sum(pqs) / len(pqs)


def test_pq_counts_what_panopticapi_counts():
    # torchmetrics alone drops ground truth that the prediction leaves void: an empty prediction
    # scored NaN and one right segment with abstention elsewhere scored 100.
    things, stuffs = [1, 2], [3]
    target = torch.zeros(12, 10, 2, dtype=torch.long)
    target[:4, :, 0], target[:4, :, 1] = 1, 1
    target[4:8, :5, 0], target[4:8, :5, 1] = 2, 2
    target[8:, :, 0], target[8:, :, 1] = 3, 3
    target[4:8, 5:] = 0  # ground-truth void
    empty = torch.zeros_like(target)
    one_right = empty.clone()
    one_right[:4] = target[:4]
    partly = target.clone()
    partly[4:8, :3] = 0  # a thing predicted only on 2 of its 5 columns (IoU 0.4: not matched)
    partly[9:] = 0  # the stuff predicted on 1 of its 4 rows: IoU 0.25
    partly[4:8, 5:, 0], partly[4:8, 5:, 1] = 1, 7  # a segment on ground-truth void: ignored
    unknown = target.clone()
    unknown[8:, :, 0] = 9  # an unknown category: no prediction
    for pred, expected in [(empty, 0.0), (one_right, 100 / 3), (partly, 100 / 3), (target, 100.0),
                           (unknown, 200 / 3)]:
        score = PanopticScore(things, stuffs)
        score.update(pred, target)
        got = score.compute()["pq"]
        assert got == pytest.approx(_panopticapi_pq(pred, target, things + stuffs), abs=1e-9)
        assert got == pytest.approx(expected, abs=1e-9)
