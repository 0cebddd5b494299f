"""The hGRU cell of C-RBP Pathfinder (DESIGN section 2), as a drop-in ``nn.Module``."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from ..conv import engines as conv_engines
from . import tracked
from .backends import BACKEND_NAMES, Linearization, resolve_backend
from .reference import NORM_KINDS, HGRUParams, NormSpec

GATE_BIAS_INITS = ("published", "chronos")
_UNUSED_PUBLISHED_KEYS = ("bn.0.", "bn.2.")


def _check_choice(arg: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{arg}: expected one of {choices}, got {value!r}")


class HGRUCell(nn.Module):
    """One step ``h' = F(x, h)`` of the horizontal gated recurrent unit (hGRU).

    The step of the C-RBP Pathfinder hGRU (see :mod:`crbp_fast.hgru.reference` for the
    equations). Parameter names follow the published implementation, so its state_dicts load
    (their unused ``bn.0.*`` and ``bn.2.*`` entries are dropped on load).

    Args:
        channels: C, the channels of the drive x and of the state h.
        kernel_size: k, the odd size of the two horizontal k x k kernels.
        norm: normalisation of the conv outputs: ``"batch"`` (BatchNorm with batch statistics
            in training and eval, as published), ``"group"`` (GroupNorm, per-sample statistics)
            or ``"none"``.
        gate_bias_init: ``"published"`` (b1 ~ U(1, 7), the published code's effective init) or
            ``"chronos"`` (b1 = log U(1, 7)); b2 = -b1 in both.
        backend: ``"torch"`` (reference), ``"triton"``, ``"native"`` or ``"auto"``.
        conv: horizontal convolution engine, ``"direct"``, ``"fft"`` or ``"auto"``.
        norm_groups: groups of ``norm="group"``; must divide ``channels``.
        eps: the normalisation's epsilon, a finite number > 0 (1e-3 as published).
        device, dtype: where and in which floating ``torch.dtype`` the parameters live (a
            cell may be built on ``"meta"`` for deferred initialisation, but not run there).

    Normalisation statistics need more than one value per channel (``"batch"``, in training
    and in eval, since batch statistics are used in both) or per group (``"group"``).

    Example:
        >>> cell = HGRUCell(channels=25, kernel_size=15)
        >>> x = torch.randn(2, 25, 32, 32)
        >>> h = cell(x, torch.zeros_like(x))
    """

    def __init__(
        self, channels: int, kernel_size: int, norm: str = "batch",
        gate_bias_init: str = "published", backend: str = "auto", conv: str = "auto", *,
        norm_groups: int = 1, eps: float = 1e-3, device=None, dtype=None,
    ):
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels: expected a positive int, got {channels!r}")
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: expected a positive odd int, got {kernel_size!r}")
        _check_choice("norm", norm, NORM_KINDS)
        _check_choice("gate_bias_init", gate_bias_init, GATE_BIAS_INITS)
        _check_choice("backend", backend, BACKEND_NAMES)
        conv_engines.check_conv_name(conv)
        if norm == "group" and (not isinstance(norm_groups, int) or norm_groups < 1 or channels % norm_groups):
            raise ValueError(f"norm_groups: expected a positive divisor of channels={channels}, got {norm_groups!r}")
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"dtype: expected a floating torch.dtype such as torch.float32, got {dtype!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps: expected a finite number > 0 (the normalisation's epsilon), got {eps!r}")
        try:
            torch.device(device) if device is not None else None
        except (TypeError, RuntimeError) as err:
            raise ValueError(f"device: expected a torch.device or a name such as 'cpu' or 'cuda', got {device!r}: {err}") from None
        self.channels = channels
        self.kernel_size = kernel_size
        self.norm = norm
        self.norm_groups = norm_groups if norm == "group" else 1
        self.eps = float(eps)
        self.gate_bias_init = gate_bias_init
        self.backend = backend
        self.conv = conv
        fk = {"device": device, "dtype": dtype}
        c, k = channels, kernel_size
        self.u1_gate = nn.Conv2d(c, c, 1, **fk)
        self.u2_gate = nn.Conv2d(c, c, 1, **fk)
        self.w_gate_inh = nn.Parameter(torch.empty(c, c, k, k, **fk))
        self.w_gate_exc = nn.Parameter(torch.empty(c, c, k, k, **fk))
        self.alpha = nn.Parameter(torch.empty(c, 1, 1, **fk))
        self.gamma = nn.Parameter(torch.empty(c, 1, 1, **fk))
        self.kappa = nn.Parameter(torch.empty(c, 1, 1, **fk))
        self.w = nn.Parameter(torch.empty(c, 1, 1, **fk))
        self.mu = nn.Parameter(torch.empty(c, 1, 1, **fk))
        if norm != "none":
            def make_norm() -> nn.Module:
                if norm == "batch":
                    return nn.BatchNorm2d(c, eps=eps, track_running_stats=False, **fk)
                return nn.GroupNorm(norm_groups, c, eps=eps, **fk)

            # Indices 1 and 3 as published (its bn.0 and bn.2 were never used).
            self.bn = nn.ModuleDict({"1": make_norm(), "3": make_norm()})
        self._register_load_state_dict_pre_hook(self._drop_unused_published_keys)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The published initialisation (DESIGN section 2)."""
        for weight in (self.w_gate_inh, self.w_gate_exc, self.u1_gate.weight, self.u2_gate.weight):
            if weight.dtype in (torch.float16, torch.bfloat16):
                # QR (geqrf) has no half-precision kernel: orthogonalise in float32, then round
                with torch.no_grad():
                    weight.copy_(nn.init.orthogonal_(torch.empty_like(weight, dtype=torch.float32)))
            else:
                nn.init.orthogonal_(weight)
        if self.norm != "none":
            for mod in self.bn.values():
                nn.init.constant_(mod.weight, 0.1)
                nn.init.zeros_(mod.bias)
        for p, value in ((self.alpha, 0.1), (self.gamma, 1.0), (self.kappa, 0.5), (self.w, 0.5), (self.mu, 1.0)):
            nn.init.constant_(p, value)
        with torch.no_grad():
            b1 = torch.empty_like(self.u1_gate.bias).uniform_(1.0, 7.0)
            if self.gate_bias_init == "chronos":
                b1 = b1.log()
            self.u1_gate.bias.copy_(b1)
            self.u2_gate.bias.copy_(-b1)

    def _drop_unused_published_keys(self, state_dict, prefix, *args) -> None:
        for key in [k for k in state_dict if k.startswith(prefix) and k[len(prefix):].startswith(_UNUSED_PUBLISHED_KEYS)]:
            del state_dict[key]

    def extra_repr(self) -> str:
        # Say what will run, not only what was asked for: "auto" resolves per device (backend)
        # and per input shape (conv engine).
        device = self.w_gate_inh.device
        try:
            runs = resolve_backend(self.backend, device).name
            backend = f"{self.backend!r}" + ("" if runs == self.backend else f" (runs {runs!r} on {device.type})")
        except Exception:  # a repr must not raise; running the cell says why
            backend = f"{self.backend!r} (cannot run on {device.type})"
        conv = f"{self.conv!r}" + (" (direct or fft, chosen per input shape)" if self.conv == "auto" else "")
        norm = f"{self.norm!r}" + (f", norm_groups={self.norm_groups}" if self.norm == "group" else "")
        return (
            f"channels={self.channels}, kernel_size={self.kernel_size}, norm={norm}, eps={self.eps:g}, "
            f"gate_bias_init={self.gate_bias_init!r}, backend={backend}, conv={conv}"
        )

    # ---------------------------------------------------------------------------------------

    def params(self) -> HGRUParams:
        """The step's parameters as plain tensors, for the backend passes."""
        def spec(index: str) -> NormSpec:
            if self.norm == "none":
                return NormSpec("none")
            mod = self.bn[index]
            return NormSpec(self.norm, mod.weight, mod.bias, self.eps, self.norm_groups)

        return HGRUParams(
            u1_weight=self.u1_gate.weight, u1_bias=self.u1_gate.bias,
            u2_weight=self.u2_gate.weight, u2_bias=self.u2_gate.bias,
            w_inh=self.w_gate_inh, w_exc=self.w_gate_exc, alpha=self.alpha, mu=self.mu,
            kappa=self.kappa, gamma=self.gamma, omega=self.w,
            norm_inh=spec("1"), norm_exc=spec("3"),
        )

    def check_inputs(self, x: Tensor, h: Tensor | None) -> Tensor:
        """Validate (x, h) against the cell; returns h (zeros when None)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating dtype, got {x.dtype}")
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"x: expected shape (B, {self.channels}, H, W) for a cell with channels={self.channels}, "
                f"got {tuple(x.shape)}"
            )
        if x.shape[0] < 1 or x.shape[2] < 1 or x.shape[3] < 1:
            raise ValueError(f"x: expected non-empty batch and spatial dims, got {tuple(x.shape)}")
        if self.norm == "batch" and x.shape[0] * x.shape[2] * x.shape[3] < 2:
            # Batch statistics are used in eval mode too (as published), where one value per
            # channel would normalise every output to the bias: a constant, not an error.
            raise ValueError(
                f"x: norm='batch' takes statistics over (B, H, W) in training and in eval and needs more than "
                f"one value per channel, got shape {tuple(x.shape)}; use a larger batch or norm='group'"
            )
        if self.norm == "group" and (self.channels // self.norm_groups) * x.shape[2] * x.shape[3] < 2:
            raise ValueError(
                f"x: norm='group' with {self.norm_groups} groups of {self.channels // self.norm_groups} channel(s) needs "
                f"more than one value per group, got shape {tuple(x.shape)}; use fewer norm_groups or larger images"
            )
        param = self.w_gate_inh
        if x.device != param.device:
            raise ValueError(f"x: is on device {x.device} but the cell's parameters are on {param.device}")
        if x.device.type == "meta":
            raise ValueError(
                "x: is on device meta, where the cell cannot run (meta tensors hold no values); expected "
                "cpu or cuda: materialise the cell with cell.to_empty(device='cpu') and cell.reset_parameters(), "
                "or load a state_dict"
            )
        if x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"x: has dtype {x.dtype} but the cell's parameters are {param.dtype}; "
                f"convert one of them (e.g. cell.to({x.dtype}))"
            )
        if h is None:
            return torch.zeros_like(x)
        if not isinstance(h, Tensor):
            raise TypeError(f"h: expected a torch.Tensor or None, got {type(h).__name__}")
        if h.shape != x.shape:
            raise ValueError(f"h: expected the shape of x {tuple(x.shape)}, got {tuple(h.shape)}")
        if h.dtype != x.dtype:
            raise TypeError(f"h: expected the dtype of x ({x.dtype}), got {h.dtype}")
        if h.device != x.device:
            raise ValueError(f"h: expected the device of x ({x.device}), got {h.device}")
        return h

    def _backend_and_conv(self, x: Tensor):
        return (
            resolve_backend(self.backend, x.device),
            conv_engines.resolve_conv(self.conv, x, self.kernel_size),
        )

    def forward(self, x: Tensor, h: Tensor | None = None) -> Tensor:
        """One step F(x, h); x, h of shape (B, C, H, W), h=None means zeros."""
        h = self.check_inputs(x, h)
        backend, engine = self._backend_and_conv(x)
        return backend.step(self.params(), x.contiguous(), h.contiguous(), engine)

    def linearize(self, x: Tensor, h: Tensor) -> Linearization:
        """F at (x, h) with everything its VJP ``J^T v`` needs computed once.

        Returns an object with ``.state`` (= F(x, h), detached) and ``.vjp(v)`` (= J^T v with
        J = dF/dh at h), used by :func:`crbp_fast.engine.fixed_point` in the adjoint loop.
        """
        h = self.check_inputs(x, h)
        backend, engine = self._backend_and_conv(x)
        return backend.linearize(self.params(), x.detach().contiguous(), h.detach().contiguous(), engine)

    def tracked_step(self, x: Tensor, h: Tensor, lcp_target: float | None = None):
        """F(x, h) for a step that autograd differentiates, and with ``lcp_target`` the LCP
        penalty mean(relu(1^T J - lcp_target)^2) at h, J = dF/dh.

        Returns the state, or (state, penalty). One autograd node whose backward is one pass of
        explicit passes for both (:mod:`crbp_fast.hgru.tracked`), used by
        :func:`crbp_fast.engine.fixed_point` for the tracked step of rbp / crbp; under autocast
        or in half precision the step and the penalty go through autograd (the penalty by a
        double backward, as published). Values equal ``cell(x, h)`` and
        :func:`crbp_fast.lcp_penalty`, and so do the gradients in x and every parameter; the
        gradient in h also differentiates the penalty in h (``lcp_penalty`` takes J at a
        detached h; ``fixed_point`` passes a detached fixed point, where the two agree).
        """
        h = self.check_inputs(x, h)
        backend, engine = self._backend_and_conv(x)
        p = self.params()
        x, h = x.contiguous(), h.contiguous()
        if lcp_target is not None:
            lcp_target = float(lcp_target)
        if tracked.supported(x, h, p):
            return tracked.tracked_step(x, h, p, engine, lcp_target, tracked.passes_for(backend.name, x))
        if lcp_target is None:
            return self(x, h)
        from ..engine.lcp import lcp_from_step

        differentiable = torch.is_grad_enabled()
        h_in = h if h.requires_grad and differentiable else h.detach().requires_grad_(True)
        with torch.enable_grad():
            out = self(x, h_in)
            penalty = lcp_from_step(out, h_in, lcp_target, create_graph=differentiable)
        return (out, penalty) if differentiable else (out.detach(), penalty.detach())

    def linearization_of(self, state: Tensor) -> Linearization | None:
        """The linearisation at the point of the :meth:`tracked_step` that returned ``state``,
        from that step's factors (no second step, no conv): what :func:`crbp_fast.engine.fixed_point`
        uses for its adjoint instead of :meth:`linearize` at the same (x, h). None where the
        step's passes do not provide it (only the native backend's do), and then
        :meth:`linearize` is the way."""
        return tracked.linearization_of(state)

    @property
    def padding(self) -> int:
        """The 'same' padding of the horizontal convs (an attribute of the published module)."""
        return self.kernel_size // 2


__all__ = ["HGRUCell", "GATE_BIAS_INITS"]
