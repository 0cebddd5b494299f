"""Procedural Pathfinder images: contours of short paddles, markers, and their labels or masks.

The picture (DESIGN section 6): two long *target* contours of ``length`` paddles, distractor
contours of ``length // 3`` paddles (``30 / (length // 3)`` of them at 150 x 150), paddles of
thickness 2 separated by gaps with a bounded turn between consecutive ones (continuity 1.8),
and circular markers of radius 5. Everything is drawn at twice the output size (300 x 300 for
the default 150) as anti-aliased thick segments and discs, then 2 x 2 area-downsampled.

- ``task="classification"``: two markers; label 1 when they sit at the two ends of one target
  contour, 0 when they sit at one end of each target contour.
- ``task="segmentation"``: one marker at one end of one target contour; the mask is that
  contour plus its marker (the downsampled rendering of the two alone, thresholded at 0.5).

Every sample is a function of ``(seed, index)`` alone (its own PCG64 stream from
``SeedSequence(seed, spawn_key=(index,))``), so any index can be drawn independently: the
torch Dataset draws on the fly by index, and DDP shards a batch by index.

Geometry is in pixels of the 2x canvas and does not scale with ``size``; the number of
distractors scales with the image area, so a smaller image keeps the published density.

Example:
    >>> images, masks = generate(16, task="segmentation", length=14, size=150, seed=0)
    >>> images.shape, images.dtype
    ((16, 1, 150, 150), dtype('uint8'))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

TASKS = ("classification", "segmentation")
MIN_LENGTH, MAX_LENGTH = 2, 40
MIN_SIZE = 16


@dataclass(frozen=True)
class PathfinderConfig:
    """The drawing parameters, in pixels of the 2x canvas (300 x 300 for 150 x 150 images).

    From DESIGN section 6: paddle thickness 2, continuity 1.8, marker radius 5, distractors of
    ``length // 3`` paddles, ``30 / (length // 3)`` of them. DESIGN gives no paddle length or gap:
    5 and 3 are the published snakes generator's settings for this variant. How continuity maps
    to a turn, and the clearance between contours, are this generator's choices.

    Attributes:
        paddle_length: length of one paddle (a straight dash).
        paddle_gap: gap between consecutive paddles of a contour.
        paddle_thickness: stroke width of a paddle.
        continuity: straightness of a contour: the turn between consecutive paddles is drawn
            uniformly in ``+-pi / (2 * continuity)`` (smaller values curve faster).
        marker_radius: radius of the circular markers.
        clearance: the least gap between the strokes of two different contours (or a contour
            and another contour's marker), so that no contour touches another.
        distractors_at_150: distractor contours of a 150 x 150 image, as a multiple of
            ``1 / (length // 3)`` (30: ``30 / (length // 3)`` distractors); scaled by the
            image area for other sizes.
        paddle_retries: directions tried for one paddle before its contour's walk fails.
        contour_retries: walks tried for one contour; a distractor that fails them all is left
            out, a target contour that does restarts the image.
        target_retries: image restarts before :class:`PathfinderError` (image too small).
    """

    paddle_length: float = 5.0
    paddle_gap: float = 3.0
    paddle_thickness: float = 2.0
    continuity: float = 1.8
    marker_radius: float = 5.0
    clearance: float = 4.0
    distractors_at_150: float = 30.0
    paddle_retries: int = 4
    contour_retries: int = 4
    target_retries: int = 200

    @property
    def max_turn(self) -> float:
        return math.pi / (2.0 * self.continuity)


DEFAULT_CONFIG = PathfinderConfig()


@dataclass
class PathfinderSample:
    """One drawn sample with the geometry behind it (coordinates in output pixels, (y, x)).

    Attributes:
        image: uint8 (size, size), 0 background, 255 full stroke.
        mask: uint8 (size, size) of 0/1 for segmentation (the marked contour and its marker),
            None for classification.
        label: 1 or 0 for classification (markers on one contour or on two), -1 for segmentation.
        markers: centres of the drawn markers, in continuous output coordinates (pixel (i, j)
            spans [i, i + 1) x [j, j + 1)).
        marker_radius: their radius in output pixels.
        target_paddles: for each target contour, its paddles as (length, 4) arrays of
            (y0, x0, y1, x1) in continuous output coordinates, in order from one end.
    """

    image: np.ndarray
    mask: np.ndarray | None
    label: int
    markers: list[tuple[float, float]]
    marker_radius: float
    target_paddles: list[np.ndarray] = field(repr=False)


class PathfinderError(RuntimeError):
    """The generator could not place the target contours (image too small for the length)."""


def check_task(task: object) -> str:
    """``task`` if it is one of :data:`TASKS`, else ``ValueError`` naming it."""
    if task not in TASKS:
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    return task  # type: ignore[return-value]


def check_length(length: object) -> int:
    """``length`` if it is an int in 2..40, else ``ValueError`` naming it."""
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or not MIN_LENGTH <= length <= MAX_LENGTH:
        raise ValueError(f"length: expected an int contour length in {MIN_LENGTH}..{MAX_LENGTH}, got {length!r}")
    return int(length)


def check_size(size: object) -> int:
    """``size`` if it is an int >= 16, else ``ValueError`` naming it."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise ValueError(f"size: expected an int image size >= {MIN_SIZE}, got {size!r}")
    return int(size)


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The independent PCG64 stream of sample ``index`` of dataset ``seed``."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(int(seed), spawn_key=(int(index),))))


def distractor_count(length: int, size: int, config: PathfinderConfig = DEFAULT_CONFIG) -> int:
    """``30 / (length // 3)`` at 150 x 150, scaled by the image area for other sizes."""
    return int(config.distractors_at_150 / max(1, length // 3) * (size / 150.0) ** 2)


#: Directions of the precomputed paddle keep-out stamps (the angle error is at most half a bin).
_STAMP_ANGLES = 128


@lru_cache(maxsize=8)
def _stamps(length: float, keep_out: float) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """Keep-out masks of a paddle of ``length`` for each of ``_STAMP_ANGLES`` directions.

    Mask ``a`` holds the pixels whose centres lie within ``keep_out`` of a paddle starting at the
    centre of pixel (0, 0) in direction ``2 pi a / _STAMP_ANGLES``; with it its top-left offset
    (row, column) relative to that pixel.
    """
    m = int(math.ceil(length + keep_out)) + 1
    r = np.arange(-m, m + 1, dtype=np.float64)
    py, px = r[:, None], r[None, :]
    masks, offsets = [], []
    for a in range(_STAMP_ANGLES):
        theta = 2.0 * math.pi * a / _STAMP_ANGLES
        dy, dx = length * math.sin(theta), length * math.cos(theta)
        t = np.clip((py * dy + px * dx) / (length * length), 0.0, 1.0)
        inside = (py - t * dy) ** 2 + (px - t * dx) ** 2 <= keep_out * keep_out
        rows, cols = np.nonzero(inside)
        masks.append(inside[rows.min():rows.max() + 1, cols.min():cols.max() + 1].copy())
        offsets.append((int(rows.min()) - m, int(cols.min()) - m))
    return masks, offsets


class _Plan:
    """The 2x canvas being planned: an owner grid (which paddle claims each pixel) and strokes.

    The owner grid has a margin of ``pad`` pixels on every side, so stamps near the border need no
    clipping; canvas pixel (i, j) is ``owner[i + pad, j + pad]``.
    """

    def __init__(self, size: int, config: PathfinderConfig):
        self.n = 2 * size
        self.cfg = config
        # A stroke centre must stay this far from another contour's centre line.
        self.keep_out = config.paddle_thickness + config.clearance
        self.pad = int(math.ceil(self.keep_out)) + 2
        self.masks, self.offsets = _stamps(float(config.paddle_length), float(self.keep_out))
        k = self.pad
        self.owner = np.zeros((self.n + 2 * k, self.n + 2 * k), dtype=np.int32)
        self.next_id = 1
        self.paddles: list[tuple[float, float, float, float]] = []  # (y0, x0, y1, x1), canvas px
        self.border = config.paddle_thickness + 1.0
        self._axis = np.arange(-k, self.n + k, dtype=np.float64) + 0.5

    def _stamp(self, y0: float, x0: float, theta: float, pid: int) -> None:
        """Give the free pixels within ``keep_out`` of the paddle from (y0, x0) at angle theta to ``pid``.

        Uses the precomputed mask of the nearest of ``_STAMP_ANGLES`` directions, placed at the
        pixel holding the start: exact to about a pixel, as the collision test that reads it.
        """
        a = int(round(theta * (_STAMP_ANGLES / (2.0 * math.pi)))) % _STAMP_ANGLES
        mask = self.masks[a]
        oy, ox = self.offsets[a]
        top, left = int(y0) + oy + self.pad, int(x0) + ox + self.pad
        sub = self.owner[top:top + mask.shape[0], left:left + mask.shape[1]]
        sub[mask & (sub == 0)] = pid

    def free_for(self, y0: float, x0: float, y1: float, x1: float, allowed: int) -> bool:
        """Whether the segment stays inside the canvas and crosses no pixel owned by another paddle."""
        lo, hi = self.border, self.n - self.border
        if not (lo <= y1 <= hi and lo <= x1 <= hi and lo <= y0 <= hi and lo <= x0 <= hi):
            return False
        steps = int(math.ceil(math.hypot(y1 - y0, x1 - x0))) + 1
        owner, k = self.owner, self.pad
        for i in range(steps + 1):
            t = i / steps
            o = owner.item(int(y0 + t * (y1 - y0)) + k, int(x0 + t * (x1 - x0)) + k)
            if o != 0 and o != allowed:
                return False
        return True

    def walk(self, rng: np.random.Generator, n_paddles: int) -> tuple[int, int] | None:
        """Draw one contour of ``n_paddles`` as a random walk; returns its paddle id range or None.

        A failed walk leaves the canvas as it was.
        """
        cfg = self.cfg
        first = self.next_id
        n_before = len(self.paddles)
        lo, hi = self.border, self.n - self.border
        y, x = rng.uniform(lo, hi, size=2)
        length, gap, turn = cfg.paddle_length, cfg.paddle_gap, cfg.max_turn
        # Directions to try: a uniform one per attempt for the first paddle, turns after it.
        first_dirs = rng.uniform(0.0, 2.0 * math.pi, size=cfg.paddle_retries).tolist()
        turns = rng.uniform(-turn, turn, size=(n_paddles, cfg.paddle_retries)).tolist()
        theta, prev = 0.0, 0
        for i in range(n_paddles):
            for attempt in range(cfg.paddle_retries):
                if i == 0:
                    t = first_dirs[attempt]
                    sy, sx = y, x
                else:
                    t = theta + turns[i][attempt]
                    sy, sx = y + gap * math.sin(t), x + gap * math.cos(t)
                ey, ex = sy + length * math.sin(t), sx + length * math.cos(t)
                if self.free_for(sy, sx, ey, ex, prev):
                    break
            else:
                self.undo(first, n_before)
                return None
            pid = self.next_id
            self.next_id += 1
            self.paddles.append((sy, sx, ey, ex))
            self._stamp(sy, sx, t, pid)
            y, x, theta, prev = ey, ex, t, pid
        return first, self.next_id

    def claim_disc(self, cy: float, cx: float, radius: float, own: tuple[int, int]) -> bool:
        """Reserve a marker's surroundings for the contour owning paddles ``own``; False if taken."""
        r = self.cfg.marker_radius
        if not (r + 1 <= cy <= self.n - r - 1 and r + 1 <= cx <= self.n - r - 1):
            return False
        k = self.pad
        lo_y, hi_y = max(int(cy - radius) + k, 0), min(int(cy + radius) + 2 + k, self.owner.shape[0])
        lo_x, hi_x = max(int(cx - radius) + k, 0), min(int(cx + radius) + 2 + k, self.owner.shape[1])
        py = self._axis[lo_y:hi_y, None]
        px = self._axis[None, lo_x:hi_x]
        inside = (py - cy) ** 2 + (px - cx) ** 2 <= radius * radius
        sub = self.owner[lo_y:hi_y, lo_x:hi_x]
        o = sub[inside]
        if np.any((o != 0) & ((o < own[0]) | (o >= own[1]))):
            return False
        sub[inside & (sub == 0)] = own[0]
        return True

    def undo(self, first_id: int, n_paddles: int) -> None:
        """Forget every paddle and claim from ``first_id`` on (``n_paddles`` paddles stay)."""
        self.owner[self.owner >= first_id] = 0
        self.next_id = first_id
        del self.paddles[n_paddles:]


def _render_into(canvas: np.ndarray, segments: np.ndarray, discs: np.ndarray, thickness: float, radius: float) -> None:
    """Draw anti-aliased strokes (segments (S, 4) of y0, x0, y1, x1) and discs (D, 2) into ``canvas``.

    A pixel's value is its coverage with a one-pixel linear ramp at the edge,
    ``clip(half_width + 0.5 - distance, 0, 1)``, combined with what is there by maximum.
    """
    n = canvas.shape[0]
    for shapes, half, is_disc in ((segments, thickness / 2.0, False), (discs, radius, True)):
        if len(shapes) == 0:
            continue
        s = np.asarray(shapes, dtype=np.float64)
        y0, x0 = s[:, 0], s[:, 1]
        y1, x1 = (y0, x0) if is_disc else (s[:, 2], s[:, 3])
        reach = half + 1.0
        oy = np.floor(np.minimum(y0, y1) - reach).astype(np.int64)
        ox = np.floor(np.minimum(x0, x1) - reach).astype(np.int64)
        span = int(math.ceil(float(np.max(np.maximum(np.abs(y1 - y0), np.abs(x1 - x0)))) + 2 * reach)) + 2
        r = np.arange(span)
        iy = oy[:, None, None] + r[None, :, None]
        ix = ox[:, None, None] + r[None, None, :]
        ry = iy + (0.5 - y0[:, None, None])
        rx = ix + (0.5 - x0[:, None, None])
        dy, dx = (y1 - y0)[:, None, None], (x1 - x0)[:, None, None]
        den = np.maximum(dy * dy + dx * dx, 1e-12)
        t = np.minimum(np.maximum((ry * dy + rx * dx) / den, 0.0), 1.0)
        d = np.sqrt((ry - t * dy) ** 2 + (rx - t * dx) ** 2)
        val = np.minimum(np.maximum(half + 0.5 - d, 0.0), 1.0)
        iy, ix = np.broadcast_arrays(iy, ix)
        keep = (val > 0) & (iy >= 0) & (iy < n) & (ix >= 0) & (ix < n)
        np.maximum.at(canvas, (iy[keep], ix[keep]), val[keep].astype(np.float32))


def _downsample(canvas: np.ndarray) -> np.ndarray:
    """2 x 2 area average."""
    return 0.25 * (canvas[0::2, 0::2] + canvas[1::2, 0::2] + canvas[0::2, 1::2] + canvas[1::2, 1::2])


def draw(
    rng: np.random.Generator, task: str = "segmentation", length: int = 14, size: int = 150,
    config: PathfinderConfig = DEFAULT_CONFIG,
) -> PathfinderSample:
    """Draw one sample from ``rng`` (see the module docstring for the picture and the labels).

    Raises:
        ValueError: task, length or size out of range.
        PathfinderError: the two target contours did not fit (image too small for the length).
    """
    check_task(task)
    check_length(length)
    check_size(size)
    cfg = config
    label = int(rng.integers(2)) if task == "classification" else -1
    marker_keep_out = cfg.marker_radius + cfg.paddle_thickness / 2.0 + cfg.clearance
    for _ in range(cfg.target_retries):
        plan = _Plan(size, cfg)
        targets = []
        for _contour in range(2):
            for _try in range(cfg.contour_retries):
                ids = plan.walk(rng, length)
                if ids is None:
                    continue
                first, last = ids
                a = plan.paddles[first - 1]
                b = plan.paddles[last - 2]
                # Reserve both ends for markers, so either can carry one.
                if (plan.claim_disc(a[0], a[1], marker_keep_out, ids)
                        and plan.claim_disc(b[2], b[3], marker_keep_out, ids)):
                    targets.append(ids)
                    break
                plan.undo(first, first - 1)
            else:
                break
        if len(targets) == 2:
            break
    else:
        raise PathfinderError(
            f"could not place two target contours of length {length} in a {size} x {size} image after "
            f"{cfg.target_retries} tries; use a larger size or a shorter length"
        )
    for _ in range(distractor_count(length, size, cfg)):
        for _try in range(cfg.contour_retries):
            if plan.walk(rng, max(1, length // 3)) is not None:
                break

    segments = np.asarray(plan.paddles, dtype=np.float64)
    ends = []
    for first, last in targets:
        a, b = plan.paddles[first - 1], plan.paddles[last - 2]
        ends.append(((a[0], a[1]), (b[2], b[3])))
    which = int(rng.integers(2))  # which target contour carries the (first) marker
    side = int(rng.integers(2))  # and at which of its ends
    if task == "segmentation":
        markers = [ends[which][side]]
    elif label == 1:
        markers = [ends[which][0], ends[which][1]]
    else:
        markers = [ends[which][side], ends[1 - which][int(rng.integers(2))]]
    discs = np.asarray(markers, dtype=np.float64)

    canvas = np.zeros((2 * size, 2 * size), dtype=np.float32)
    mask = None
    if task == "segmentation":
        # The mask is the marked contour and its marker rendered alone; the image is that
        # rendering with every other contour drawn over it (by maximum).
        first, last = targets[which]
        _render_into(canvas, segments[first - 1:last - 1], discs, cfg.paddle_thickness, cfg.marker_radius)
        mask = (_downsample(canvas) >= 0.5).astype(np.uint8)
        others = np.concatenate([segments[:first - 1], segments[last - 1:]])
        _render_into(canvas, others, discs[:0], cfg.paddle_thickness, cfg.marker_radius)
    else:
        _render_into(canvas, segments, discs, cfg.paddle_thickness, cfg.marker_radius)
    image_u8 = np.round(_downsample(canvas) * 255.0).astype(np.uint8)
    target_paddles = [segments[first - 1:last - 1] / 2.0 for first, last in targets]
    return PathfinderSample(
        image=image_u8, mask=mask, label=label, markers=[(y / 2.0, x / 2.0) for y, x in markers],
        marker_radius=cfg.marker_radius / 2.0, target_paddles=target_paddles,
    )


def draw_index(
    seed: int, index: int, task: str = "segmentation", length: int = 14, size: int = 150,
    config: PathfinderConfig = DEFAULT_CONFIG,
) -> PathfinderSample:
    """Sample ``index`` of the dataset ``seed``: the same arrays every time, on any machine."""
    return draw(sample_rng(seed, index), task, length, size, config)


def generate(
    n: int, task: str = "segmentation", length: int = 14, size: int = 150, seed: int = 0, *,
    start: int = 0, config: PathfinderConfig = DEFAULT_CONFIG,
) -> tuple[np.ndarray, np.ndarray]:
    """Samples ``start .. start + n - 1`` of the dataset ``seed``.

    Args:
        n: number of images.
        task: ``"segmentation"`` or ``"classification"``.
        length: paddles per target contour, 2..40 (published: 6, 9, 14 for classification;
            14, 20, 25 for segmentation).
        size: output image side (150 as published; drawn at twice that).
        seed: dataset seed; with the index it fixes every sample.
        start: index of the first sample.
        config: drawing parameters (:class:`PathfinderConfig`).

    Returns:
        ``(images, targets)``: images uint8 (n, 1, size, size), 0..255; targets uint8 0/1 masks
        (n, 1, size, size) for segmentation, int64 labels (n,) for classification.

    Example:
        >>> images, labels = generate(8, task="classification", length=9, seed=3)
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n: expected an int >= 0, got {n!r}")
    check_task(task)
    check_length(length)
    check_size(size)
    images = np.zeros((n, 1, size, size), dtype=np.uint8)
    if task == "segmentation":
        targets = np.zeros((n, 1, size, size), dtype=np.uint8)
    else:
        targets = np.zeros((n,), dtype=np.int64)
    for i in range(n):
        s = draw_index(seed, start + i, task, length, size, config)
        images[i, 0] = s.image
        if task == "segmentation":
            targets[i, 0] = s.mask
        else:
            targets[i] = s.label
    return images, targets


__all__ = [
    "DEFAULT_CONFIG", "MAX_LENGTH", "MIN_LENGTH", "PathfinderConfig", "PathfinderError", "PathfinderSample",
    "TASKS", "check_length", "check_size", "check_task", "distractor_count", "draw", "draw_index", "generate",
    "sample_rng",
]
