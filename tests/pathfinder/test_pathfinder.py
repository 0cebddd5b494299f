"""The Pathfinder generator: determinism, what the masks and labels mean, and bad arguments."""

from __future__ import annotations

import numpy as np
import pytest

from crbp_fast.tasks.pathfinder import generator as pf


def _ends(paddles: np.ndarray) -> np.ndarray:
    """The two ends (y, x) of a contour given as its ordered paddles (L, 4)."""
    return np.array([paddles[0, :2], paddles[-1, 2:]])


@pytest.mark.parametrize("task", pf.TASKS)
def test_shapes_and_dtypes(task):
    images, targets = pf.generate(3, task, 4, 32, seed=0)
    assert images.shape == (3, 1, 32, 32) and images.dtype == np.uint8
    if task == "segmentation":
        assert targets.shape == (3, 1, 32, 32) and targets.dtype == np.uint8
        assert set(np.unique(targets)) <= {0, 1}
    else:
        assert targets.shape == (3,) and targets.dtype == np.int64
    assert images.max() == 255  # markers are drawn at full intensity


def test_same_seed_same_images_and_any_index_alone():
    a = pf.generate(5, "segmentation", 6, 48, seed=7)
    b = pf.generate(5, "segmentation", 6, 48, seed=7)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    one = pf.generate(1, "segmentation", 6, 48, seed=7, start=3)
    np.testing.assert_array_equal(one[0][0], a[0][3])
    np.testing.assert_array_equal(one[1][0], a[1][3])
    other = pf.generate(5, "segmentation", 6, 48, seed=8)
    assert not np.array_equal(other[0], a[0])


def test_segmentation_mask_is_the_marked_contour_plus_its_marker():
    for i in range(12):
        s = pf.draw_index(0, i, "segmentation", 8, 64)
        mask = s.mask.astype(bool)
        # On drawn pixels: the image is at least the thresholded (0.5) rendering of the target.
        assert s.image[mask].min() >= 127, f"sample {i}: mask pixel on an undrawn image pixel"
        # The whole marker disc (pixels well inside its radius) is in the mask.
        (cy, cx), r = s.markers[0], s.marker_radius
        yy, xx = np.mgrid[:64, :64] + 0.5
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= (r - 0.75) ** 2
        assert inside.sum() >= 5 and mask[inside].all(), f"sample {i}: marker disc not fully in the mask"
        # The marker sits at one end of a target contour, and the mask follows that contour.
        marked = [k for k, p in enumerate(s.target_paddles) if np.min(np.hypot(*(_ends(p) - (cy, cx)).T)) < 1e-9]
        assert len(marked) == 1, f"sample {i}: marker not at the end of exactly one target contour"
        centres = s.target_paddles[marked[0]].reshape(-1, 2, 2).mean(axis=1)  # paddle midpoints
        assert mask[centres[:, 0].astype(int), centres[:, 1].astype(int)].mean() > 0.8
        other = s.target_paddles[1 - marked[0]].reshape(-1, 2, 2).mean(axis=1)
        assert not mask[other[:, 0].astype(int), other[:, 1].astype(int)].any(), "the other contour is in the mask"


def test_mask_size_grows_with_contour_length():
    sizes = [pf.generate(8, "segmentation", length, 150, seed=1)[1].sum() / 8 for length in (6, 14, 25)]
    assert sizes[0] < sizes[1] < sizes[2], sizes
    assert sizes[2] > 2.5 * sizes[0], sizes


def test_classification_labels_balanced_and_meaningful():
    _, labels = pf.generate(300, "classification", 4, 32, seed=2)
    assert 0.42 <= labels.mean() <= 0.58, labels.mean()
    for i in range(10):
        s = pf.draw_index(2, i, "classification", 6, 48)
        assert len(s.markers) == 2
        owners = []
        for m in s.markers:
            at = [k for k, p in enumerate(s.target_paddles) if np.min(np.hypot(*(_ends(p) - m).T)) < 1e-9]
            assert len(at) == 1
            owners.append(at[0])
        assert (owners[0] == owners[1]) == (s.label == 1), f"sample {i}: label {s.label}, markers on {owners}"
        assert s.mask is None


def test_distractor_count_follows_the_published_rule():
    assert pf.distractor_count(14, 150) == 7  # 30 / (14 // 3)
    assert pf.distractor_count(25, 150) == 3  # 30 / 8
    assert pf.distractor_count(6, 150) == 15


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"task": "detection"}, "task: expected one of"),
        ({"length": 41}, "length: expected an int contour length in 2..40, got 41"),
        ({"length": 1}, "length: .* got 1"),
        ({"size": 8}, "size: expected an int image size >= 16, got 8"),
    ],
    ids=["task", "length-41", "length-1", "size"],
)
def test_bad_arguments_are_named(kwargs, match):
    args = {"task": "segmentation", "length": 4, "size": 32, **kwargs}
    with pytest.raises(ValueError, match=match):
        pf.generate(1, **args)


def test_contour_too_long_for_the_image():
    with pytest.raises(pf.PathfinderError, match="length 30 in a 16 x 16 image"):
        pf.generate(1, "segmentation", 30, 16, config=pf.PathfinderConfig(target_retries=3))
