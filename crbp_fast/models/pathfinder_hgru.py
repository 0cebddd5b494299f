"""The Pathfinder hGRU (DESIGN section 2): Gabor drive, the recurrent cell, a normalised readout."""

from __future__ import annotations

from typing import Iterator, NamedTuple

import torch
import torch.nn as nn
from torch import Tensor

from ..data.pathfinder import check_task
from ..fixed_point import ALGORITHMS, FixedPointStats, fixed_point
from ..hgru import HGRUCell
from .gabor import gabor_bank

DRIVE_KERNEL = 7


class PathfinderOutput(NamedTuple):
    """``logits``: (B, 2, H, W) for segmentation, (B, 2) for classification; ``penalty``: LCP or None."""

    logits: Tensor
    penalty: Tensor | None
    stats: FixedPointStats


def readout_norm(kind: str, channels: int, groups: int, eps: float = 1e-3) -> nn.Module:
    """The readout's normalisation, of the cell's kind: batch statistics, GroupNorm or none."""
    if kind == "batch":
        return nn.BatchNorm2d(channels, eps=eps, track_running_stats=False)
    if kind == "group":
        return nn.GroupNorm(groups, channels, eps=eps)
    return nn.Identity()


class PathfinderHGRU(nn.Module):
    """hGRU for Pathfinder: x = conv0(image)^2, h_N by ``fixed_point``, then a readout.

    - ``conv0``: 7 x 7, 1 -> ``channels``, padding 3, initialised with :func:`gabor_bank`.
    - ``cell``: :class:`crbp_fast.HGRUCell` run from h0 = 0 for ``steps`` steps with
      ``algorithm`` (bptt, cbptt, rbp, crbp).
    - segmentation: ``readout_norm`` (BatchNorm with batch statistics, as the cell's ``norm``)
      -> ``readout`` 1 x 1 conv to 2 per-pixel logits;
      classification: ``readout_norm`` -> global max pooling -> ``readout`` linear to 2.

    Args:
        task: ``"segmentation"`` or ``"classification"``.
        channels: C (25 in the paper).
        kernel_size: k of the horizontal kernels (15 in the paper).
        steps: N, recurrent steps in training and evaluation.
        algorithm: training algorithm of :func:`crbp_fast.fixed_point`.
        norm: ``"batch"`` (published), ``"group"`` or ``"none"``, for the cell and the readout.
        backend, conv, gate_bias_init, norm_groups: passed to :class:`HGRUCell`.
        adjoint_steps, adjoint_tol, lcp_target: passed to :func:`crbp_fast.fixed_point`.

    Example:
        >>> model = PathfinderHGRU("segmentation", channels=25, kernel_size=15, steps=20, algorithm="crbp")
        >>> out = model(images)                     # images (B, 1, 150, 150) in [0, 1]
        >>> loss = focal_loss(out.logits, masks) + 10 * out.penalty
    """

    def __init__(
        self, task: str = "segmentation", channels: int = 25, kernel_size: int = 15, *, steps: int = 20,
        algorithm: str = "crbp", norm: str = "batch", backend: str = "auto", conv: str = "auto",
        gate_bias_init: str = "published", norm_groups: int = 1, adjoint_steps: int = 15,
        adjoint_tol: float = 1e-5, lcp_target: float = 0.9,
    ):
        super().__init__()
        self.task = check_task(task)
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm: expected one of {ALGORITHMS}, got {algorithm!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
        self.steps, self.algorithm = steps, algorithm
        self.adjoint_steps, self.adjoint_tol, self.lcp_target = adjoint_steps, adjoint_tol, lcp_target
        self.cell = HGRUCell(
            channels, kernel_size, norm=norm, gate_bias_init=gate_bias_init, backend=backend, conv=conv,
            norm_groups=norm_groups,
        )
        self.conv0 = nn.Conv2d(1, channels, DRIVE_KERNEL, padding=DRIVE_KERNEL // 2)
        with torch.no_grad():
            self.conv0.weight.copy_(gabor_bank(channels, DRIVE_KERNEL))
            self.conv0.bias.zero_()
        self.readout_norm = readout_norm(norm, channels, self.cell.norm_groups)
        self.readout = nn.Conv2d(channels, 2, 1) if task == "segmentation" else nn.Linear(channels, 2)
        self.config = {
            "task": task, "channels": channels, "kernel_size": kernel_size, "steps": steps, "algorithm": algorithm,
            "norm": norm, "backend": backend, "conv": conv, "gate_bias_init": gate_bias_init,
            "norm_groups": norm_groups, "adjoint_steps": adjoint_steps, "adjoint_tol": adjoint_tol,
            "lcp_target": lcp_target,
        }

    def drive(self, images: Tensor) -> Tensor:
        """x = conv0(images)^2, (B, C, H, W), from images (B, 1, H, W)."""
        if images.dim() != 4 or images.shape[1] != 1:
            raise ValueError(f"images: expected shape (B, 1, H, W), got {tuple(images.shape)}")
        return self.conv0(images).pow(2)

    def head(self, h: Tensor) -> Tensor:
        """Logits from a state h (B, C, H, W): (B, 2, H, W) or (B, 2)."""
        z = self.readout_norm(h)
        if self.task == "classification":
            z = z.amax(dim=(2, 3))
        return self.readout(z)

    def forward(self, images: Tensor, steps: int | None = None) -> PathfinderOutput:
        """Logits after ``steps`` (default ``self.steps``) recurrent steps, the LCP penalty, the stats."""
        x = self.drive(images)
        res = fixed_point(
            self.cell, x, steps=self.steps if steps is None else steps, algorithm=self.algorithm,
            adjoint_steps=self.adjoint_steps, adjoint_tol=self.adjoint_tol, lcp_target=self.lcp_target,
        )
        return PathfinderOutput(self.head(res.state), res.penalty, res.stats)

    @torch.no_grad()
    def trajectory(self, images: Tensor, steps: int) -> Iterator[Tensor]:
        """The states h_1 .. h_steps from h0 = 0, one at a time, without a graph."""
        x = self.drive(images)
        h = torch.zeros_like(x)
        for _ in range(steps):
            h = self.cell(x, h)
            yield h


__all__ = ["PathfinderHGRU", "PathfinderOutput", "readout_norm"]
