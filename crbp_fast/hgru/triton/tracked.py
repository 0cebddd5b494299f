"""The tracked step's passes as Triton kernels: what :mod:`crbp_fast.hgru.tracked` runs for
``backend="triton"`` (CUDA; CPU under triton's interpreter, for tests).

The composition is :class:`crbp_fast.hgru.plane_tracked.PlanePasses` (same names, arguments and
results as :mod:`crbp_fast.hgru.reference`); this module supplies its kernels: the plane passes
of ``csrc/cpu/plane_passes.h`` as one Triton kernel with a body per pass
(:mod:`crbp_fast.hgru.triton.plane_kernels`), and the gate, normalisation statistics, norm VJP
and gate VJP of the Triton step (:mod:`crbp_fast.hgru.triton.hgru`). The norm VJP takes the sums
of the pass that wrote its input (one apply pass) where that pass took them, else a ``plane_dot``
first. Per-plane sums are float64 partials per block of a plane, added on the host; no atomics,
so the results are deterministic. Results equal the reference's up to rounding.

Not yet run on a GPU (only compiled for sm_90, in the tests): on CUDA they are opt-in
(``CRBP_FAST_CUDA_TRACKED=1``, as the native CUDA passes) until their gpu tests pass there.
Dtypes float32 and float64 (the tracked node's); cells of at most
:data:`~crbp_fast.hgru.triton.hgru.MAX_CHANNELS` channels (the gate kernels hold every channel).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..plane_tracked import CUDA_SWITCH, PlanePasses, cuda_opted_in, opmath
from ..reference import NormSpec, lcp_weights
from . import hgru as triton_hgru
from . import ops, plane_kernels
from .hgru import MAX_CHANNELS, TritonLinearization
from .hgru import Factors as TritonFactors


class PassSpec(NamedTuple):
    """A row of csrc/cpu/plane_passes.h: the pass's number, input and output names, how many
    per-plane scalars it reads and sums it writes, the inputs that may be None and the outputs
    that may be skipped."""

    number: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    scalars: int
    sums: int
    nullable: tuple[str, ...] = ()
    skippable: tuple[str, ...] = ()


SPECS = {
    "plane_dot": PassSpec(0, ("a", "b"), (), 0, 2),
    "tangent_gate_inh": PassSpec(1, ("w", "g1", "h", "m1"), ("g1_t", "hg_t"), 0, 0),
    "tangent_inhibit": PassSpec(
        2, ("c1_raw_t", "xhat1", "dc1_coef", "c1", "w", "s_q", "s_r"), ("xhat1_t", "c1_t", "q_t", "r_t", "h1_t"), 5, 0,
        ("xhat1",), ("xhat1_t", "c1_t")),
    "tangent_excite_mix": PassSpec(
        3, ("c2_raw_t", "xhat2", "w", "h1_t", "g2_t", "c2", "h1", "s_e", "g2", "hh_minus_h", "s_z", "v", "dz", "de",
            "dc2_coef", "dh1_coef", "g2_slope", "dc2"), ("xhat2_t", "dc2_t", "dh1_t", "dh_t", "dm2_t"), 7, 6,
        ("xhat2", "v"), ("xhat2_t",)),
    "norm_vjp_tangent": PassSpec(4, ("dr", "dc_t", "xhat_t", "xhat"), ("dr_t",), 6, 0),
    "tangent_vjp_inhibit": PassSpec(
        5, ("dh1_t", "dh1_t_extra", "s_r", "r_t", "s_q", "q_t", "dh1", "dq_coef", "dc1_coef", "dq", "w", "c1", "c1_t",
            "h", "dh_t", "xhat1", "dc1", "xhat1_t"), ("dx", "dh_t", "dc1_t"), 1, 5, ("dh1_t_extra", "xhat1")),
    "tangent_vjp_gate_inh": PassSpec(
        6, ("dhg_t", "dhg", "hg1_slope", "w", "g1", "h", "g1_t", "dh_t"), ("dm1_t", "dm1", "dh_t"), 0, 0),
    "tracked_inhibit": PassSpec(
        7, ("c1_raw", "x", "h"), ("c1", "xhat1", "dc1_coef", "s_q", "s_r", "dq_coef", "dh_q_coef", "h1"), 6, 0, (),
        ("c1", "xhat1")),
    "tracked_excite_mix": PassSpec(
        8, ("c2_raw", "h", "h1", "g2"),
        ("state", "s_z", "hh_minus_h", "s_e", "dc2_coef", "dh1_coef", "g2_slope", "xhat2", "c2"), 7, 0, (),
        ("xhat2", "c2")),
    "column_sums_excite_mix": PassSpec(
        9, ("s_z", "g2", "s_e", "hh_minus_h", "g2_slope", "dc2_coef"), ("de", "dm2", "dc2"), 0, 0),
    "column_sums_inhibit": PassSpec(
        10, ("de", "dh1_coef", "dh1_mix", "dh1_conv", "dq_coef", "dc1_coef", "s_z", "g2", "dh_q_coef"),
        ("dh1", "dq", "dc1", "dh"), 0, 0),
    "step_vjp_excite_mix": PassSpec(
        11, ("v", "s_z", "g2", "s_e", "hh_minus_h", "g2_slope", "dc2_coef", "dh1_coef", "h1", "c2", "xhat2"),
        ("dm2", "dc2", "dh1", "dh"), 0, 6, ("xhat2",)),
    "step_vjp_inhibit": PassSpec(
        12, ("dh1", "dh1_extra", "s_r", "dq_coef", "dc1_coef", "c1", "h", "dh", "xhat1"), ("dx", "dc1", "dh"), 1, 4,
        ("dh1_extra", "xhat1")),
    "native_factors": PassSpec(
        13, ("dq_coef", "dc1_coef", "dh_q_coef", "s_z", "g2", "s_e", "dc2_coef", "dh1_coef", "hh_minus_h", "g2_slope"),
        ("dh1_to_dc1", "dh1_to_dh", "v_to_dc2", "v_to_dh1", "v_to_dm2", "v_to_dh"), 0, 0),
}


def _mask(names: tuple[str, ...], chosen) -> int:
    return sum(1 << i for i, n in enumerate(names) if n in chosen)


def _describe(t) -> str:
    """What an argument is, for an error message: dtype, shape, device and (when not contiguous)
    strides of a tensor, else its type."""
    if not isinstance(t, Tensor):
        return "None" if t is None else type(t).__name__
    layout = "" if t.is_contiguous() else f" with strides {t.stride()}"
    return f"{t.dtype} {tuple(t.shape)} tensor on {t.device}{layout}"


def plane_pass(name: str, maps: list[Tensor | None], scalars: Tensor | None = None, skip: int = 0) -> list:
    """The plane pass ``name`` (:meth:`crbp_fast.hgru.plane_tracked.PlaneKernels.plane_pass`):
    its outputs (None where ``skip`` has the output's bit), then its (B, C, sums) float64
    per-plane sums when it has any."""
    spec = SPECS.get(name)
    if spec is None:
        raise ValueError(f"name: expected one of {sorted(SPECS)}, got {name!r}")
    if len(maps) != len(spec.inputs):
        raise ValueError(f"{name}: maps: expected {len(spec.inputs)} maps {spec.inputs}, got {len(maps)}")
    ref = maps[0]
    if not isinstance(ref, Tensor) or ref.dim() != 4 or ref.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{name}: {spec.inputs[0]}: expected a float32/float64 (B, C, H, W) tensor, got {_describe(ref)}")
    for n, m in zip(spec.inputs, maps):
        if m is None:
            if n not in spec.nullable:
                raise ValueError(f"{name}: {n}: expected a tensor, got None")
        elif not isinstance(m, Tensor) or m.shape != ref.shape or m.dtype != ref.dtype or m.device != ref.device \
                or not m.is_contiguous():
            raise ValueError(f"{name}: {n}: expected a contiguous {_describe(ref)} (like {spec.inputs[0]}), "
                             f"got {_describe(m)}")
    b, c, hgt, wid = ref.shape
    if spec.scalars:
        want = torch.empty((b, c, spec.scalars), dtype=opmath(ref), device="meta")
        if not isinstance(scalars, Tensor) or scalars.shape != want.shape or scalars.dtype != want.dtype \
                or scalars.device != ref.device or not scalars.is_contiguous():
            raise ValueError(f"{name}: scalars: expected a contiguous {want.dtype} {tuple(want.shape)} tensor on "
                             f"{ref.device}, got {_describe(scalars)}")
    elif scalars is not None:
        raise ValueError(f"{name}: scalars: expected None (the pass has no per-plane scalars), got a tensor")
    allowed = _mask(spec.outputs, spec.skippable)
    if skip < 0 or skip & ~allowed:
        raise ValueError(f"{name}: skip: expected a mask of the skippable outputs ({allowed}), got {skip}")
    hw = hgt * wid
    outs = [None if (skip >> i) & 1 else torch.empty_like(ref) for i in range(len(spec.outputs))]
    blocks = triton_hgru.triton_cdiv(hw, plane_kernels.PLANE_BLOCK)
    sums = torch.empty((b * c, blocks, spec.sums), device=ref.device, dtype=torch.float64) if spec.sums else ref
    if b * c and hw:
        # Pointers for a None input, a skipped output and absent scalars: never read or written.
        written = next((o for o in outs if o is not None), ref)
        with ops._on(ref):
            plane_kernels.plane_pass_kernel[(b * c * blocks,)](
                tuple(ref if m is None else m for m in maps), tuple(written if o is None else o for o in outs)
                or (ref,), ref if scalars is None else scalars, sums, hw, blocks,
                PASS=spec.number, NS=spec.scalars, NSUM=spec.sums, NONE=_mask(spec.inputs, [
                    n for n, m in zip(spec.inputs, maps) if m is None]), SKIP=skip,
                BLOCK=plane_kernels.PLANE_BLOCK, ACC=ops._tl_acc(ref), num_warps=plane_kernels.NUM_WARPS,
            )
    if not spec.sums:
        return outs
    return [*outs, sums.sum(1).reshape(b, c, spec.sums)]  # no blocks (empty planes): zeros


class _Kernels:
    """The Triton kernels (:class:`crbp_fast.hgru.plane_tracked.PlaneKernels`)."""

    plane_pass = staticmethod(plane_pass)

    @staticmethod
    def gate_inh(h, p):
        return tuple(ops.gate_inh(h, p.u1_weight.detach(), p.u1_bias.detach(), h.dtype, True))

    @staticmethod
    def norm_stats(c_raw, spec):
        return triton_hgru.norm_stats(c_raw, spec)

    @staticmethod
    def norm_vjp(dc, xhat, invstd, spec: NormSpec, sums=None):
        dc, xhat = dc.detach().contiguous(), xhat.detach().contiguous()
        b, c = dc.shape[:2]
        if sums is None:
            (both,) = plane_pass("plane_dot", [dc, xhat])
            sums = (both[..., 0], both[..., 1])
        # The Triton step's norm VJP, on one float64 "partial" per plane (its set means in float64).
        inv = invstd.detach().reshape(-1, c).expand(b, c).to(opmath(dc))
        return triton_hgru.norm_vjp(dc, xhat, inv, [s.unsqueeze(-1) for s in sums], spec)

    @staticmethod
    def vjp_gate_inh(dhg, dh, g1, hg1_slope, p):
        return ops.vjp_gate_inh(dhg, dh, g1, hg1_slope, p.u1_weight.detach(), dhg.dtype)

    @staticmethod
    def linearization(p, f, products, invstd, engine):
        dh1_to_dc1, dh1_to_dh, v_to_dc2, v_to_dh1, v_to_dm2, v_to_dh = products
        factors = TritonFactors(
            state=f.state, p1=v_to_dc2, p2=v_to_dh1, p3=v_to_dm2, p4=v_to_dh, xhat2=f.xhat2, invstd2=invstd[1],
            q1=dh1_to_dc1, q2=dh1_to_dh, xhat1=f.xhat1, invstd1=invstd[0], g1=f.g1, s1=f.hg1_slope,
        )
        return TritonLinearization.from_factors(p, factors, engine)


PASSES = PlanePasses(_Kernels())
# The passes as this module's functions (the tracked node and lcp_tangent look them up here).
(column_sums, linearization, linearize_tracked, step_vjp, tangent_excite_mix, tangent_gate_inh, tangent_inhibit,
 tangent_vjp_gate_inh, tangent_vjp_inhibit, lcp_tangent) = PASSES.module_functions(__name__)


#: The dtypes of these passes (the tracked node's; half precisions keep the autograd route).
DTYPES = (torch.float32, torch.float64)


def supported(x: Tensor) -> bool:
    """Whether these passes run for maps like ``x``: float32 / float64 on a device the Triton
    backend runs on (CPU under the interpreter; CUDA when ``CRBP_FAST_CUDA_TRACKED=1``, until
    their gpu tests have passed on a GPU), at most MAX_CHANNELS channels."""
    if x.dtype not in DTYPES or x.dim() != 4 or x.shape[1] > MAX_CHANNELS:
        return False
    if x.device.type == "cuda" and not cuda_opted_in():
        return False
    return triton_hgru.unavailable_reason(x.device) == ""


__all__ = [
    "CUDA_SWITCH",
    "PASSES",
    "SPECS",
    "column_sums",
    "lcp_tangent",
    "lcp_weights",
    "linearization",
    "linearize_tracked",
    "plane_pass",
    "step_vjp",
    "supported",
    "tangent_excite_mix",
    "tangent_gate_inh",
    "tangent_inhibit",
    "tangent_vjp_gate_inh",
    "tangent_vjp_inhibit",
]
