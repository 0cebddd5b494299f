"""A generated Gabor filter bank: the initial weights of the Pathfinder model's first conv."""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: (sigma, wavelength) per scale, in pixels; the 7 x 7 support holds about +-1.5 sigma of the larger one.
SCALES = ((1.4, 3.5), (2.2, 5.5), (3.0, 8.0))
PHASES = (0.0, math.pi / 2)  # even (cosine) and odd (sine) filters


def gabor_bank(n_filters: int = 25, size: int = 7, orientations: int = 8, aspect: float = 0.6) -> Tensor:
    """``n_filters`` Gabor filters of ``size`` x ``size``, shape (n_filters, 1, size, size), float32.

    The bank enumerates scale, then phase, then orientation (``orientations`` angles evenly in
    [0, pi)), and keeps the first ``n_filters`` (25 of the 48 for the paper's model: every
    orientation and phase at the finest scale, the even ones and one odd one at the next scale).
    Each filter is g(x', y') = exp(-(x'^2 + aspect^2 y'^2) / (2 sigma^2)) cos(2 pi x' / lambda + phase)
    in coordinates rotated by the orientation, made zero-mean (so a uniform image gives no drive)
    and scaled to unit L2 norm.

    Args:
        n_filters: number of filters, 1 .. len(SCALES) * len(PHASES) * orientations.
        size: odd filter side.
        orientations: orientations per (scale, phase).
        aspect: spatial aspect ratio of the envelope (< 1: elongated along the stripes).

    Example:
        >>> conv0.weight.data.copy_(gabor_bank(25, 7))
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 3 or size % 2 == 0:
        raise ValueError(f"size: expected an odd int >= 3, got {size!r}")
    if isinstance(orientations, bool) or not isinstance(orientations, int) or orientations < 1:
        raise ValueError(f"orientations: expected a positive int, got {orientations!r}")
    most = len(SCALES) * len(PHASES) * orientations
    if isinstance(n_filters, bool) or not isinstance(n_filters, int) or not 1 <= n_filters <= most:
        raise ValueError(
            f"n_filters: expected an int in 1..{most} (for orientations={orientations}), got {n_filters!r}")
    r = torch.arange(size, dtype=torch.float64) - size // 2
    y, x = torch.meshgrid(r, r, indexing="ij")
    combos = [
        (sigma, wavelength, phase, math.pi * k / orientations)
        for sigma, wavelength in SCALES for phase in PHASES for k in range(orientations)
    ][:n_filters]
    filters = []
    for sigma, wavelength, phase, theta in combos:
        xr = x * math.cos(theta) + y * math.sin(theta)
        yr = -x * math.sin(theta) + y * math.cos(theta)
        g = torch.exp(-(xr**2 + (aspect * yr) ** 2) / (2 * sigma**2)) * torch.cos(2 * math.pi * xr / wavelength + phase)
        g = g - g.mean()
        filters.append(g / g.norm())
    return torch.stack(filters)[:, None].float()
