"""Generated first-layer banks: the initial weights of the Pathfinder model's conv0.

- :func:`published_bank` (the default): the structure of the published Pathfinder model's bank
  (``gabor_serre.npy`` there): 24 zero-mean, unit-norm Gabor filters in two groups of 12
  orientations, and one non-negative Gaussian blob of mean 1 that passes plain brightness, so
  that the marker and the contour pixels themselves drive the cell, not only their edges.
- :func:`gabor_bank`: this package's earlier bank, 25 zero-mean Gabors over three scales; kept
  by name (``PathfinderHGRU(conv0_bank="zero_mean")``) for runs that were initialised with it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: (sigma, wavelength) per scale, in pixels, of :func:`gabor_bank`.
SCALES = ((1.4, 3.5), (2.2, 5.5), (3.0, 8.0))
PHASES = (0.0, math.pi / 2)  # even (cosine) and odd (sine) filters

#: Gabor parameters of :func:`published_bank`: the 7 x 7 S1 filters of Serre et al. (2007)
#: (envelope sigma 2.8, wavelength 3.5, aspect 0.3), the "Serre" bank of the published model.
PUBLISHED_SIGMA, PUBLISHED_WAVELENGTH, PUBLISHED_ASPECT = 2.8, 3.5, 0.3
#: Width of the published bank's brightness blob; at 7 x 7 and mean 1 its peak is 1.697
#: (sum 49), the published blob's profile (peak about 1.69).
BLOB_SIGMA = 2.6


def _check_size(size: object) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 3 or size % 2 == 0:
        raise ValueError(f"size: expected an odd int >= 3, got {size!r}")
    return size


def _gabor(size: int, sigma: float, wavelength: float, aspect: float, phase: float, theta: float) -> Tensor:
    """One zero-mean, unit-norm Gabor filter, float64 (size, size).

    g(x', y') = exp(-(x'^2 + aspect^2 y'^2) / (2 sigma^2)) cos(2 pi x' / wavelength + phase) in
    coordinates rotated by theta; the mean is removed so that a uniform image gives no drive.
    """
    r = torch.arange(size, dtype=torch.float64) - size // 2
    y, x = torch.meshgrid(r, r, indexing="ij")
    xr = x * math.cos(theta) + y * math.sin(theta)
    yr = -x * math.sin(theta) + y * math.cos(theta)
    g = torch.exp(-(xr**2 + (aspect * yr) ** 2) / (2 * sigma**2)) * torch.cos(2 * math.pi * xr / wavelength + phase)
    g = g - g.mean()
    return g / g.norm()


def brightness_blob(size: int = 7, sigma: float = BLOB_SIGMA) -> Tensor:
    """A non-negative isotropic Gaussian of mean 1 (sum size^2), float64 (size, size)."""
    _check_size(size)
    r = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma**2))
    return g / g.mean()


def published_bank(n_filters: int = 25, size: int = 7) -> Tensor:
    """The published model's bank structure, shape (n_filters, 1, size, size), float32.

    Filters 0 .. n_filters - 2 are zero-mean, unit-norm Gabors in two groups (even, then odd
    phase) of m = ceil((n_filters - 1) / 2) orientations k pi / m each (for 25 filters: two
    groups of 12 orientations, 15 degrees apart), with the parameters of
    :data:`PUBLISHED_SIGMA` and friends; the last filter is :func:`brightness_blob`. The values
    are generated here, not read from the published ``.npy`` file; the structure (zero-mean
    unit-norm oriented filters plus one mean-1 blob) is what makes the drive x = conv0(image)^2
    carry both edges and brightness.

    Args:
        n_filters: number of filters (conv0's output channels), >= 1.
        size: odd filter side (7 as published).

    Example:
        >>> conv0.weight.data.copy_(published_bank(25, 7))
    """
    _check_size(size)
    if isinstance(n_filters, bool) or not isinstance(n_filters, int) or n_filters < 1:
        raise ValueError(f"n_filters: expected an int >= 1, got {n_filters!r}")
    n_gabor = n_filters - 1
    m = max(1, math.ceil(n_gabor / 2))
    combos = [(phase, math.pi * k / m) for phase in PHASES for k in range(m)][:n_gabor]
    filters = [
        _gabor(size, PUBLISHED_SIGMA, PUBLISHED_WAVELENGTH, PUBLISHED_ASPECT, phase, theta) for phase, theta in combos
    ]
    filters.append(brightness_blob(size))
    return torch.stack(filters)[:, None].float()


def gabor_bank(n_filters: int = 25, size: int = 7, orientations: int = 8, aspect: float = 0.6) -> Tensor:
    """``n_filters`` zero-mean Gabor filters of ``size`` x ``size``, shape (n_filters, 1, size, size), float32.

    This package's earlier bank (``conv0_bank="zero_mean"``; the default is :func:`published_bank`).
    It enumerates scale (:data:`SCALES`), then phase, then orientation (``orientations`` angles
    evenly in [0, pi)), and keeps the first ``n_filters`` (25 of the 48 for the paper's model:
    every orientation and phase at the finest scale, the even ones and one odd one at the next
    scale). Each filter is zero-mean and unit-norm (see ``_gabor``): none passes brightness.

    Args:
        n_filters: number of filters, 1 .. len(SCALES) * len(PHASES) * orientations.
        size: odd filter side.
        orientations: orientations per (scale, phase).
        aspect: spatial aspect ratio of the envelope (< 1: elongated along the stripes).

    Example:
        >>> conv0.weight.data.copy_(gabor_bank(25, 7))
    """
    _check_size(size)
    if isinstance(orientations, bool) or not isinstance(orientations, int) or orientations < 1:
        raise ValueError(f"orientations: expected a positive int, got {orientations!r}")
    most = len(SCALES) * len(PHASES) * orientations
    if isinstance(n_filters, bool) or not isinstance(n_filters, int) or not 1 <= n_filters <= most:
        raise ValueError(
            f"n_filters: expected an int in 1..{most} (for orientations={orientations}), got {n_filters!r}")
    combos = [
        (sigma, wavelength, phase, math.pi * k / orientations)
        for sigma, wavelength in SCALES for phase in PHASES for k in range(orientations)
    ][:n_filters]
    return torch.stack([_gabor(size, s, w, aspect, ph, th) for s, w, ph, th in combos])[:, None].float()
