"""``RecurrentFPN``: torchvision's FeaturePyramidNetwork with recurrent laterals trained by C-RBP.

The published recurrent FPN (DESIGN section 7): each level's 1x1 lateral conv becomes a recurrent
cell (by default :class:`~crbp_fast.hgru.ConvHGRUCell`: input = the backbone's channels at that
level, state = the FPN width, 3x3 kernels, GroupNorm) run towards its fixed point with
:func:`crbp_fast.engine.fixed_point`, then a GroupNorm; the top-down nearest-upsample sum, the 3x3 output
convs and the extra blocks are torchvision's own (this class subclasses
``torchvision.ops.FeaturePyramidNetwork`` and replaces only its lateral step), so it is a drop-in
wherever torchvision takes an FPN, with the same constructor arguments and the same
``OrderedDict`` in and out. The LCP penalties of the levels are summed into ``fpn.penalty`` for
the training loss.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

from ...engine.fixed_point import ALGORITHMS, FixedPointResult, FixedPointStats, fixed_point
from ...hgru import ConvHGRUCell

CELLS = ("hgru",)
#: The LCP target of the published recurrent FPN (0.9 for Pathfinder).
FPN_LCP_TARGET = 0.95


def default_groups(channels: int, most: int = 32) -> int:
    """The largest divisor of ``channels`` that is at most ``most`` (GroupNorm's 32 at width 256)."""
    return max(g for g in range(1, min(most, channels) + 1) if channels % g == 0)


class RecurrentLateral(nn.Module):
    """One level's lateral: a recurrent cell run to its fixed point, then GroupNorm.

    With a cell that has ``drive(x)`` and ``step`` (as :class:`ConvHGRUCell`), the drive is
    computed once and ``step`` is iterated on it; any other cell is iterated as ``cell(x, h)``.
    """

    def __init__(self, cell: nn.Module, out_channels: int, groups: int):
        super().__init__()
        self.cell = cell
        self.out_channels = out_channels
        self.norm = nn.GroupNorm(groups, out_channels)

    def solve(self, x: Tensor, options: dict) -> FixedPointResult:
        if hasattr(self.cell, "drive") and hasattr(self.cell, "step"):
            drive, f = self.cell.drive(x), self.cell.step
        else:
            drive, f = x, self.cell
        h0 = drive.new_zeros(drive.shape[0], self.out_channels, *drive.shape[2:])
        return fixed_point(f, drive, h0, **options)


class RecurrentFPN(FeaturePyramidNetwork):
    """A drop-in for ``torchvision.ops.FeaturePyramidNetwork`` whose laterals are recurrent.

    Args:
        in_channels_list, out_channels, extra_blocks, norm_layer: as torchvision's FPN
            (``norm_layer`` applies to its 3x3 output convs, as there).
        cell: ``"hgru"`` (:class:`ConvHGRUCell`, the published cell) or a callable
            ``cell(in_channels, out_channels) -> nn.Module`` whose module is a step ``f(x, h) -> h``
            with h of ``out_channels`` (it may offer ``drive(x)`` and ``step``, as ConvHGRUCell).
        cell_options: keyword arguments of :class:`ConvHGRUCell` for ``cell="hgru"`` (e.g.
            ``kernel_size``, ``norm_groups``, ``backend``).
        steps: N, forward steps per level.
        algorithm: ``"bptt"``, ``"cbptt"``, ``"rbp"`` or ``"crbp"``.
        adjoint_steps, adjoint_tol, lcp_target: as :func:`crbp_fast.engine.fixed_point` (15 adjoint
            products and target 0.95 as published for the FPN; ``adjoint_tol=0`` runs all 15).
        fixed_point_options: further keyword arguments of :func:`crbp_fast.engine.fixed_point`
            (``adjoint_solver``, ``adjoint_rule``, ``solver``, ``tol``, ...).
        groups: GroupNorm groups after each lateral (default: the largest divisor of
            ``out_channels`` up to 32).

    After a forward, ``fpn.penalty`` is the LCP summed over the levels (a differentiable scalar
    for cbptt / crbp in training with gradients, else None), and ``fpn.level_stats`` the
    :class:`~crbp_fast.FixedPointStats` of each level (finest first).

    Example:
        >>> fpn = RecurrentFPN([64, 128, 256, 512], 64, steps=10, algorithm="crbp")
        >>> out = fpn(OrderedDict(feat0=c2, feat1=c3, feat2=c4, feat3=c5))
        >>> loss = detection_loss(out) + lcp_weight * fpn.penalty
    """

    def __init__(
        self, in_channels_list: list[int], out_channels: int, extra_blocks: ExtraFPNBlock | None = None,
        norm_layer: Callable[..., nn.Module] | None = None, *, cell: str | Callable[[int, int], nn.Module] = "hgru",
        cell_options: dict | None = None, steps: int = 5, algorithm: str = "crbp", adjoint_steps: int = 15,
        adjoint_tol: float = 0.0, lcp_target: float = FPN_LCP_TARGET, fixed_point_options: dict | None = None,
        groups: int | None = None,
    ):
        super().__init__(in_channels_list, out_channels, extra_blocks, norm_layer)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm: expected one of {ALGORITHMS}, got {algorithm!r}")
        if isinstance(cell, str) and cell not in CELLS:
            raise ValueError(f"cell: expected one of {CELLS} or a callable (in_channels, out_channels) -> module, "
                             f"got {cell!r}")
        if not isinstance(cell, str) and not callable(cell):
            raise TypeError(f"cell: expected one of {CELLS} or a callable, got {type(cell).__name__}")
        if cell_options and not isinstance(cell, str):
            raise ValueError("cell_options: only for cell='hgru'; a callable cell takes its options itself")
        groups = default_groups(out_channels) if groups is None else groups
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or out_channels % groups:
            raise ValueError(f"groups: expected a positive divisor of out_channels={out_channels}, got {groups!r}")
        options = dict(cell_options or {})
        options.setdefault("norm_groups", default_groups(out_channels))

        def make_cell(c_in: int) -> nn.Module:
            if isinstance(cell, str):
                return ConvHGRUCell(c_in, out_channels, **options)
            return cell(c_in, out_channels)

        # torchvision's 1x1 laterals are replaced; its layer_blocks (3x3 output convs) stay, so
        # their weights load from a torchvision FPN's state_dict under the same names.
        self.inner_blocks = nn.ModuleList(
            RecurrentLateral(make_cell(c), out_channels, groups) for c in in_channels_list)
        self.steps, self.algorithm = steps, algorithm
        self.fixed_point_options = dict(fixed_point_options or {})
        clash = {"steps", "algorithm", "adjoint_steps", "adjoint_tol", "lcp_target"} & set(self.fixed_point_options)
        if clash:
            raise ValueError(f"fixed_point_options: {sorted(clash)} are RecurrentFPN arguments; pass them directly")
        self.adjoint_steps, self.adjoint_tol, self.lcp_target = adjoint_steps, adjoint_tol, lcp_target
        self.penalty: Tensor | None = None
        self.level_stats: list[FixedPointStats] = []
        self._results: dict[int, FixedPointResult] = {}

    def extra_repr(self) -> str:
        return f"steps={self.steps}, algorithm={self.algorithm!r}, adjoint_steps={self.adjoint_steps}"

    def _options(self) -> dict:
        return dict(steps=self.steps, algorithm=self.algorithm, adjoint_steps=self.adjoint_steps,
                    adjoint_tol=self.adjoint_tol, lcp_target=self.lcp_target, **self.fixed_point_options)

    def get_result_from_inner_blocks(self, x: Tensor, idx: int) -> Tensor:
        """The recurrent lateral of level ``idx``: fixed point of its cell on x, then GroupNorm."""
        idx = idx % len(self.inner_blocks)
        lateral: RecurrentLateral = self.inner_blocks[idx]
        res = lateral.solve(x, self._options())
        self._results[idx] = res
        return lateral.norm(res.state)

    def forward(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        """torchvision's FPN forward; also sets ``self.penalty`` and ``self.level_stats``."""
        if not isinstance(x, dict) or len(x) != len(self.inner_blocks):
            got = f"{len(x)} levels" if isinstance(x, dict) else type(x).__name__
            raise ValueError(f"x: expected an OrderedDict of {len(self.inner_blocks)} feature maps, got {got}")
        self._results = {}
        out: OrderedDict[str, Tensor] = super().forward(x)
        levels = [self._results[i] for i in range(len(self.inner_blocks))]
        self._results = {}
        self.level_stats = [r.stats for r in levels]
        penalties = [r.penalty for r in levels if r.penalty is not None]
        self.penalty = torch.stack(penalties).sum() if penalties else None
        return out

    @property
    def max_forward_residual(self) -> float:
        """The largest relative forward residual over the levels of the last forward (nan before one)."""
        return max((s.max_forward_residual for s in self.level_stats), default=math.nan)


__all__ = ["CELLS", "FPN_LCP_TARGET", "RecurrentFPN", "RecurrentLateral", "default_groups"]
