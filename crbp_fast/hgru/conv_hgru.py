"""The convolutional hGRU of the recurrent FPN: a projected drive and a 3x3, GroupNorm hGRU step.

The published recurrent Panoptic FPN replaces each FPN level's 1x1 lateral conv by an hGRU
variant whose input has the backbone's channels at that level and whose state has the FPN width,
with 3x3 horizontal kernels and GroupNorm. Written as

    d       = P x                      # 1x1 conv, C_in -> C (the drive; constant over the steps)
    F(d, h) = hGRU step (DESIGN section 2) with C channels, k = 3, norm = GroupNorm

the step is exactly the hGRU of :class:`~crbp_fast.hgru.HGRUCell`, so every backend (torch
reference, triton, native) and its fused ``linearize`` / ``vjp`` passes serve it unchanged, and the
projection runs once per forward instead of once per step.
"""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from .cell import HGRUCell


class ConvHGRUCell(nn.Module):
    """hGRU with a 1x1 input projection (``in_channels`` -> ``channels``), 3x3 kernels, GroupNorm.

    ``cell(x, h)`` is one step ``F(P x, h)`` (an ``f(x, h) -> h`` module for
    :func:`crbp_fast.engine.fixed_point`); a loop over many steps should call ``cell.drive(x)`` once and
    iterate ``cell.step`` (an :class:`HGRUCell`, with ``linearize``) on the drive, as
    :class:`crbp_fast.models.RecurrentFPN` does.

    Args:
        in_channels: channels of the input feature map x.
        channels: C, channels of the drive and of the state h.
        kernel_size: odd size of the horizontal kernels (3 as published for the FPN).
        norm: the hGRU's normalisation, ``"group"`` (published for the FPN), ``"batch"`` or ``"none"``.
        norm_groups: GroupNorm groups; must divide ``channels``.
        backend, conv, gate_bias_init, eps: as for :class:`HGRUCell`.

    Example:
        >>> cell = ConvHGRUCell(in_channels=64, channels=32, norm_groups=8)
        >>> x = torch.randn(2, 64, 16, 16)
        >>> h = cell(x, torch.zeros(2, 32, 16, 16))
    """

    def __init__(
        self, in_channels: int, channels: int, kernel_size: int = 3, norm: str = "group", *, norm_groups: int = 8,
        backend: str = "auto", conv: str = "auto", gate_bias_init: str = "published", eps: float = 1e-3,
        device=None, dtype=None,
    ):
        super().__init__()
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels: expected a positive int, got {in_channels!r}")
        self.in_channels = in_channels
        self.channels = channels
        self.step = HGRUCell(channels, kernel_size, norm=norm, gate_bias_init=gate_bias_init, backend=backend,
                             conv=conv, norm_groups=norm_groups, eps=eps, device=device, dtype=dtype)
        self.proj = nn.Conv2d(in_channels, channels, 1, device=device, dtype=dtype)

    def drive(self, x: Tensor) -> Tensor:
        """The drive P x of the step, (B, in_channels, H, W) -> (B, channels, H, W)."""
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x: expected shape (B, {self.in_channels}, H, W), got {shape}")
        return self.proj(x)

    def forward(self, x: Tensor, h: Tensor | None = None) -> Tensor:
        """One step F(P x, h); h of shape (B, channels, H, W), None means zeros."""
        return self.step(self.drive(x), h)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, channels={self.channels}"


__all__ = ["ConvHGRUCell"]
