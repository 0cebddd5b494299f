"""Backend registry: which implementation of the hGRU passes runs a cell's step and VJP.

A backend provides ``step(params, x, h, conv)`` (differentiable, the tracked step) and
``linearize(params, x, h, conv) -> Linearization`` (``.state`` and ``.vjp(v)``), built from the
passes named in :mod:`crbp_fast.hgru.reference`. ``"torch"`` is the reference; fused backends
register themselves here when their module imports, and ``"auto"`` takes the fastest available
one for the device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor

from . import reference
from .reference import HGRUParams

log = logging.getLogger("crbp_fast")

BACKEND_NAMES = ("auto", "torch", "triton", "native")


class Linearization(Protocol):
    """The step linearised at a fixed (x, h): ``state = F(x, h)``, ``vjp(v) = J^T v``."""

    state: Tensor

    def vjp(self, v: Tensor) -> Tensor: ...


class ConvEngineLike(Protocol):
    name: str

    def conv(self, x: Tensor, weight: Tensor) -> Tensor: ...

    def conv_transpose(self, y: Tensor, weight: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class Backend:
    """One implementation of the step and its linearisation."""

    name: str
    step: Callable[[HGRUParams, Tensor, Tensor, ConvEngineLike], Tensor]
    linearize: Callable[[HGRUParams, Tensor, Tensor, ConvEngineLike], Linearization]
    available: Callable[[torch.device], bool]
    #: Why the backend cannot run, shown when it is asked for and unavailable.
    unavailable_reason: Callable[[torch.device], str]


class AutogradLinearization:
    """Linearisation through autograd: one tracked step, then ``torch.autograd.grad`` per VJP."""

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, h: Tensor):
        with torch.enable_grad():
            self._h = h.detach().requires_grad_(True)
            self._out = fn(x.detach(), self._h)
        self.state = self._out.detach()

    def vjp(self, v: Tensor) -> Tensor:
        (u,) = torch.autograd.grad(self._out, self._h, v, retain_graph=True)
        return u


class PassLinearization:
    """Linearisation through the explicit reference passes (factors computed once)."""

    def __init__(self, params: HGRUParams, x: Tensor, h: Tensor, conv: ConvEngineLike):
        self._params = params
        self._conv = conv
        with torch.no_grad():
            self._factors = reference.linearize(x, h, params, conv.conv)
        self.state = self._factors.state

    def vjp(self, v: Tensor) -> Tensor:
        with torch.no_grad():
            return reference.vjp(v, self._factors, self._params, self._conv.conv_transpose)


def _torch_step(p: HGRUParams, x: Tensor, h: Tensor, conv: ConvEngineLike) -> Tensor:
    return reference.step(x, h, p, conv.conv)


def _torch_linearize(p: HGRUParams, x: Tensor, h: Tensor, conv: ConvEngineLike) -> Linearization:
    return AutogradLinearization(lambda xx, hh: reference.step(xx, hh, p, conv.conv), x, h)


_REGISTRY: dict[str, Backend] = {
    "torch": Backend(
        name="torch", step=_torch_step, linearize=_torch_linearize,
        available=lambda device: True, unavailable_reason=lambda device: "",
    ),
}
#: Order in which "auto" tries backends, per device type (first available wins).
_AUTO_ORDER = {"cuda": ("triton", "native", "torch"), "cpu": ("native", "torch")}
_fallback_logged: set[tuple[str, str]] = set()
#: Why a fused backend's module could not be imported (its ImportError says how to enable it).
_load_errors: dict[str, str] = {}


def register_backend(backend: Backend) -> None:
    """Make a backend available by name (fused backends call this when they import)."""
    _REGISTRY[backend.name] = backend


def _load(name: str) -> None:
    """Import the module that registers a fused backend, if it is not registered yet."""
    if name in _REGISTRY:
        return
    try:
        if name == "triton":
            from .triton import hgru as _  # noqa: F401
        elif name == "native":
            from .native import hgru as _  # noqa: F401
    except ImportError as err:  # the backend's dependency is missing: it stays unregistered
        _load_errors[name] = str(err)
        log.debug("backend %r could not be imported: %s", name, err)


def resolve_backend(name: str, device: torch.device) -> Backend:
    """The backend that runs for ``name`` on ``device``; "auto" picks the fastest available."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend: expected one of {BACKEND_NAMES}, got {name!r}")
    if name != "auto":
        _load(name)
        backend = _REGISTRY.get(name)
        if backend is None:
            raise RuntimeError(
                f"backend {name!r} is not available in this installation "
                f"({_load_errors.get(name, 'not registered')}); see README.md ('Backends') for how to enable it"
            )
        if not backend.available(device):
            raise RuntimeError(
                f"backend {name!r} cannot run on device {device}: {backend.unavailable_reason(device)}"
            )
        return backend
    order = _AUTO_ORDER.get(device.type, ("torch",))
    for candidate in order:
        _load(candidate)
        backend = _REGISTRY.get(candidate)
        if backend is not None and backend.available(device):
            return backend
        key = (candidate, device.type)
        if candidate != "torch" and key not in _fallback_logged:
            _fallback_logged.add(key)
            reason = backend.unavailable_reason(device) if backend else _load_errors.get(candidate, "not registered")
            log.info("backend 'auto' on %s: %r is not available (%s), trying the next one", device.type, candidate,
                     reason)
    return _REGISTRY["torch"]
