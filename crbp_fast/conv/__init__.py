"""Convolution engines for the cells' horizontal k x k convolutions: direct (:mod:`.engines`),
FFT with kernel spectra cached for one fixed-point solve (:mod:`.fft`), and ``"auto"``'s cost model."""

from .engines import CONV_NAMES, resolve_conv

__all__ = ["CONV_NAMES", "resolve_conv"]
