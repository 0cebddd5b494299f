"""The tracked hGRU step with the LCP penalty, differentiated by explicit passes.

:func:`tracked_step` is the last, tracked step of an implicit algorithm (rbp / crbp) as one
autograd node: its forward computes F(x, h) with every factor its backward needs
(:func:`~crbp_fast.hgru.reference.linearize_tracked`) and, for crbp, the column sums
u = J^T 1 and the penalty mean(relu(u - lambda)^2) (:func:`~crbp_fast.hgru.reference.column_sums`);
its backward is one pass, :func:`~crbp_fast.hgru.reference.lcp_tangent`, that gives the
gradient of <g, F> + <w, u> in x, h and every parameter (g the state's cotangent, w the
penalty's), so the step's backward and the penalty's second-order gradient share their two
transposed convs and two weight gradients. Autograd's route differentiates the recorded
graph of the step and then of its create_graph VJP (a double backward: more convs, more maps).

The passes come from a module of those names: the reference's, or a fused backend's plane
passes where they run (:mod:`crbp_fast.hgru.plane_tracked`, the same results up to rounding):
for ``backend="native"`` :mod:`crbp_fast.hgru.native.tracked` (CPU, and CUDA float32 on opt-in),
for ``backend="triton"`` (``"auto"`` on CUDA) :mod:`crbp_fast.hgru.triton.tracked`.

On CPU with the FFT engine the node saves the transforms of its forward convs' inputs for its
backward (four spectra, 21 MB at B2-C25-150x150, through ``save_for_backward`` like every map),
and its backward reuses them and its own convs' (a transform memo,
:class:`~crbp_fast.conv.fft._TransformMemo`), so every operand of its weight gradients is
transformed once: 8 of the 12 batch-sized rfft2 of the penalty's backward are skipped.
Elsewhere (CUDA, where a transform is cheap and memory is not) nothing is kept.

Not differentiable twice (``once_differentiable``): a higher-order gradient through the step
goes through the autograd route (``fixed_point(..., use_linearize=False)``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import reference
from .backends import ConvEngineLike
from .reference import HGRUParams

#: Dtypes the explicit passes run in (half precisions keep the autograd route).
DTYPES = (torch.float32, torch.float64)


def _tensors(p: HGRUParams) -> list[Tensor]:
    """The parameter tensors of ``p`` in StepGrads order (the norms' weight and bias last)."""
    out = list(p[:11])
    for spec in (p.norm_inh, p.norm_exc):
        if spec.kind != "none":
            out += [spec.weight, spec.bias]
    return out


@dataclass(frozen=True)
class _Config:
    params: HGRUParams
    engine: ConvEngineLike
    target: float | None
    #: linearize_tracked, column_sums, lcp_weights, step_vjp, lcp_tangent: the reference's, or a
    #: fused backend's of the same names and results (:mod:`crbp_fast.hgru.native.tracked`,
    #: :mod:`crbp_fast.hgru.triton.tracked`).
    passes: object = reference


def _memo(engine: ConvEngineLike, x: Tensor):
    """A new transform memo where the engine has one and it pays (CPU), else None."""
    make = getattr(engine, "transform_memo", None)
    return make() if make is not None and x.device.type == "cpu" else None


class _TrackedStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg: _Config, x: Tensor, h: Tensor, *tensors: Tensor):
        memo = _memo(cfg.engine, x)
        with memo if memo is not None else contextlib.nullcontext():
            out, saved = _TrackedStep._forward(ctx, cfg, x, h, tensors)
        # The forward's transforms of saved maps, saved too (index of the map, FFT size, dtype).
        ctx.main, ctx.memo_keys, spectra = len(saved), [], []
        if memo is not None:
            where = {id(s): i for i, s in enumerate(saved)}
            for t, shape, dtype, z in memo.items():
                if id(t) in where:
                    ctx.memo_keys.append((where[id(t)], shape, dtype))
                    spectra.append(z)
            memo.close()
        # Everything through save_for_backward: in-place changes of the inputs before backward
        # raise, and saved-tensor hooks (memory accounting, offloading) see every map.
        ctx.save_for_backward(*saved, *spectra)
        return out

    @staticmethod
    def _forward(ctx, cfg: _Config, x: Tensor, h: Tensor, tensors: tuple[Tensor, ...]):
        p = cfg.params  # the tensors themselves (the FFT engine keys its spectra on them)
        f, t = cfg.passes.linearize_tracked(x, h, p, cfg.engine.conv)
        ctx.cfg, ctx.inputs = cfg, 2 + len(tensors)
        # An output the loss does not use gets None, not zeros: a state-only backward must not
        # run the penalty's tangent pass on a zero weight (nor the reverse).
        ctx.set_materialize_grads(False)
        if cfg.target is None:
            maps, w, out = (), (), f.state
        else:
            u, column_maps = cfg.passes.column_sums(f, p, cfg.engine.conv_transpose)
            penalty, weights = cfg.passes.lcp_weights(u, cfg.target)
            maps, w, out = tuple(column_maps), (weights,), (f.state, penalty)
        return out, (x, h, *tensors, *f, *t, *maps, *w)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Tensor):
        everything = ctx.saved_tensors
        saved, spectra = everything[:ctx.main], everything[ctx.main:]
        memo = _memo(ctx.cfg.engine, saved[0])
        if memo is None:
            return _TrackedStep._backward(ctx, saved, grads)
        for (i, shape, dtype), z in zip(ctx.memo_keys, spectra):
            memo.put(saved[i], shape, dtype, z)
        try:
            with memo:
                return _TrackedStep._backward(ctx, saved, grads)
        finally:
            memo.close()

    @staticmethod
    def _backward(ctx, saved: tuple[Tensor, ...], grads: tuple[Tensor, ...]):
        cfg, n = ctx.cfg, ctx.inputs
        nf, nt = len(reference.Factors._fields), len(reference.Tracked._fields)
        f = reference.Factors(*saved[n:n + nf])
        t = reference.Tracked(*saved[n + nf:n + nf + nt])
        rest = saved[n + nf + nt:]
        g_state = grads[0]
        g_penalty = grads[1] if len(grads) > 1 else None
        p, engine = cfg.params, cfg.engine
        if g_penalty is None:
            if g_state is None:
                return (None,) * (1 + n)
            out = cfg.passes.step_vjp(g_state, f, t, p, engine.conv_transpose, engine.weight_grad)
        else:
            maps, w = reference.ColumnSumMaps(*rest[:-1]), rest[-1]
            out = cfg.passes.lcp_tangent(w * g_penalty, f, t, maps, p, engine.conv, engine.conv_transpose,
                                         engine.weight_grad, v=g_state)
        return (None, *(g.to(s.dtype) for g, s in zip(reference.flat_grads(out), saved[:n])))


def passes_for(backend: str, x: Tensor):
    """The module of the explicit passes for ``backend`` (a resolved name) on x's device: a fused
    backend's plane passes where they run (:func:`crbp_fast.hgru.native.tracked.supported`,
    :func:`crbp_fast.hgru.triton.tracked.supported`), else the reference's (None)."""
    if backend == "native":
        from .native import tracked as fused
    elif backend == "triton":
        from .triton import tracked as fused
    else:
        return None
    return fused if fused.supported(x) else None


def linearization_of(state: Tensor):
    """The linearisation (``.state``, ``.vjp(v) = J^T v``) at the point of the tracked step that
    computed ``state``, from that step's own factors, when its passes provide one (the fused
    ones); None otherwise (no such step, the reference's passes, or its graph already freed).
    The factors are the node's saved tensors: an in-place change of an input or a parameter
    since the step makes autograd refuse them (RuntimeError), as it would in the backward."""
    node = getattr(state, "grad_fn", None)
    if not isinstance(node, _TrackedStep._backward_cls):
        return None
    cfg = node.cfg
    make = getattr(cfg.passes, "linearization", None)
    if make is None:
        return None
    try:
        saved = node.saved_tensors
    except RuntimeError as err:
        if "freed" in str(err) or "second time" in str(err):
            return None
        raise
    n, nf = node.inputs, len(reference.Factors._fields)
    return make(reference.Factors(*saved[n:n + nf]), cfg.params, cfg.engine)


def supported(x: Tensor, h: Tensor, p: HGRUParams) -> bool:
    """Whether the explicit passes run for these inputs (else the autograd route)."""
    if torch.is_autocast_enabled(x.device.type) or x.dtype not in DTYPES:
        return False
    return all(t.dtype == x.dtype for t in _tensors(p))


def tracked_step(x: Tensor, h: Tensor, p: HGRUParams, engine: ConvEngineLike,
                 target: float | None, passes=None) -> Tensor | tuple[Tensor, Tensor]:
    """F(x, h), and with ``target`` also the LCP penalty at h, as one differentiable node
    (module docstring). ``x``, ``h`` contiguous (B, C, H, W) of one floating dtype; ``passes``
    the module of the explicit passes (the reference's by default)."""
    return _TrackedStep.apply(_Config(p, engine, target, passes or reference), x, h, *_tensors(p))


__all__ = ["linearization_of", "passes_for", "tracked_step", "supported"]
