"""Horizontal convolution engines: 'same' cross-correlation and its transpose.

An engine has ``conv(x, weight)`` (differentiable in both) and ``conv_transpose(y, weight)``
(the adjoint in the input, used by VJPs). ``resolve_conv`` maps a cell's ``conv=`` option and
an input shape to an engine.
"""

from __future__ import annotations

from torch import Tensor

from .hgru import reference

CONV_NAMES = ("auto", "direct", "fft")


class DirectConv:
    """``F.conv2d`` with 'same' zero padding (cuDNN / oneDNN)."""

    name = "direct"

    def conv(self, x: Tensor, weight: Tensor) -> Tensor:
        return reference.conv_same(x, weight)

    def conv_transpose(self, y: Tensor, weight: Tensor) -> Tensor:
        return reference.conv_same_transpose(y, weight)


DIRECT = DirectConv()


def check_conv_name(name: str) -> str:
    if name not in CONV_NAMES:
        raise ValueError(f"conv: expected one of {CONV_NAMES}, got {name!r}")
    return name


def resolve_conv(name: str, x: Tensor, kernel_size: int) -> DirectConv:
    """The engine for ``name`` at the shape of ``x``; "auto" picks the fastest for the shape."""
    check_conv_name(name)
    if name == "fft":
        raise NotImplementedError("conv='fft' is not available in this version; use 'direct'")
    return DIRECT


__all__ = ["CONV_NAMES", "DIRECT", "DirectConv", "check_conv_name", "resolve_conv"]
