"""PathfinderHGRU against the published Pathfinder code: focal loss, adjoint options, conv0 bank, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from crbp_fast.models import (
    PUBLISHED_FORMAT, PathfinderHGRU, PublishedCheckpointError, focal_loss, gabor_bank, published_bank,
)
from crbp_fast.tasks.pathfinder.train import CheckpointError, read_checkpoint


def published_focal(logits: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    """The published FocalLoss restated: flatten to (pixels, K), p_t from the data, mean."""
    z = logits.flatten(2).transpose(1, 2).reshape(-1, logits.shape[1]) if logits.dim() > 2 else logits
    logpt = F.log_softmax(z, dim=1).gather(1, target.reshape(-1, 1)).view(-1)
    pt = logpt.detach().exp()
    return (-1 * (1 - pt) ** gamma * logpt).mean()


def logits_and_target(shape=(3, 2, 5, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    target = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=g)
    return logits, target


def grad_of(loss_fn, logits):
    (g,) = torch.autograd.grad(loss_fn(logits), logits)
    return g


@pytest.mark.parametrize("shape", [(3, 2, 5, 4), (6, 2), (2, 3, 4, 4)], ids=["seg", "cls", "K3"])
@pytest.mark.parametrize("gamma", [2.0, 0.5])
def test_focal_published_gradient_treats_p_t_as_constant(shape, gamma):
    logits, target = logits_and_target(shape)
    value = focal_loss(logits, target, gamma)
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, published_focal(logits, target, gamma), rtol=1e-14, atol=0)
    g = grad_of(lambda z: focal_loss(z, target, gamma), logits)
    torch.testing.assert_close(g, grad_of(lambda z: published_focal(z, target, gamma), logits), rtol=1e-13, atol=1e-16)
    # Closed form: d/dz of -(1 - p_t)^gamma log p_t with the factor constant.
    p = logits.detach().softmax(1)
    onehot = F.one_hot(target, shape[1]).movedim(-1, 1).to(p.dtype)
    pt = (p * onehot).sum(1, keepdim=True)
    expected = -((1 - pt) ** gamma) * (onehot - p) / target.numel()
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-16)


@pytest.mark.parametrize("gamma", [2.0, 1.5])
def test_focal_differentiable_variant_adds_the_factor_derivative(gamma):
    logits, target = logits_and_target()
    a = focal_loss(logits, target, gamma, variant="published")
    b = focal_loss(logits, target, gamma, variant="differentiable")
    torch.testing.assert_close(a, b, rtol=1e-15, atol=0)  # same value
    g = grad_of(lambda z: focal_loss(z, target, gamma, variant="differentiable"), logits)
    p = logits.detach().softmax(1)
    onehot = F.one_hot(target, 2).movedim(-1, 1).to(p.dtype)
    pt = (p * onehot).sum(1, keepdim=True)
    # dL/dlog p_t = gamma (1 - p_t)^(gamma - 1) p_t log p_t - (1 - p_t)^gamma; dlog p_t/dz = onehot - p.
    dl = gamma * (1 - pt) ** (gamma - 1) * pt * pt.log() - (1 - pt) ** gamma
    torch.testing.assert_close(g, dl * (onehot - p) / target.numel(), rtol=1e-12, atol=1e-16)
    g_pub = grad_of(lambda z: focal_loss(z, target, gamma), logits)
    assert (g - g_pub).norm() > 0.1 * g_pub.norm()  # the variants really differ


def test_focal_gamma_zero_is_cross_entropy_in_both_variants():
    logits, target = logits_and_target()
    ce = F.cross_entropy(logits, target)
    for variant in ("published", "differentiable"):
        torch.testing.assert_close(focal_loss(logits, target, 0.0, variant=variant), ce, rtol=1e-14, atol=0)


def test_focal_dtype_follows_the_logits():
    logits, target = logits_and_target()
    assert focal_loss(logits.float(), target).dtype == torch.float32
    assert focal_loss(logits.detach().bfloat16(), target).dtype == torch.float32  # 16-bit is promoted


@pytest.mark.parametrize("kwargs, match", [
    (dict(variant="textbook"), "variant"), (dict(gamma=-1.0), "gamma"), (dict(gamma="2"), "gamma"),
])
def test_focal_bad_arguments_are_named(kwargs, match):
    logits, target = logits_and_target()
    with pytest.raises(ValueError, match=match):
        focal_loss(logits, target, **kwargs)


# --- the conv0 bank and the readout init -------------------------------------------------------

def peak_orientation(filt: torch.Tensor) -> float:
    """Orientation (radians in [0, pi)) of the spatial frequency where a filter's spectrum peaks."""
    n = 64
    spec = torch.fft.fft2(filt, s=(n, n)).abs()
    spec[0, 0] = 0
    ky, kx = divmod(int(spec.argmax()), n)
    fy, fx = (ky + n // 2) % n - n // 2, (kx + n // 2) % n - n // 2
    return math.atan2(fy, fx) % math.pi


def test_published_bank_structure():
    bank = published_bank(25, 7)
    assert bank.shape == (25, 1, 7, 7) and bank.dtype == torch.float32
    b = bank.double().flatten(1)
    gabors, blob = b[:24], bank[24, 0].double()
    assert gabors.mean(1).abs().max() < 1e-6  # zero-mean: no drive from a uniform image
    torch.testing.assert_close(gabors.norm(dim=1), torch.ones(24, dtype=torch.float64), rtol=1e-6, atol=0)
    assert blob.min() >= 0 and blob.sum().item() == pytest.approx(49.0, rel=1e-6)
    assert blob.mean().item() == pytest.approx(1.0, rel=1e-6) and 1.68 < blob.max().item() < 1.71
    assert blob[3, 3] == blob.max()  # centred
    # Two groups of 12: even (symmetric) then odd (antisymmetric) filters, orientations k * 15 degrees.
    flipped = bank[:24, 0].flip(-1).flip(-2)
    assert torch.allclose(flipped[:12], bank[:12, 0], atol=1e-6)
    assert torch.allclose(flipped[12:], -bank[12:24, 0], atol=1e-6)
    for group in (0, 12):
        for k in range(12):
            got = peak_orientation(bank[group + k, 0].double())
            want = math.pi * k / 12
            gap = abs(got - want) % math.pi
            assert min(gap, math.pi - gap) < math.radians(3), (group + k, math.degrees(got))  # measured <= 0.7


def test_published_bank_other_sizes_and_errors():
    small = published_bank(5, 7)
    assert small.shape == (5, 1, 7, 7) and small[-1].min() >= 0 and small[-1].mean() == pytest.approx(1.0)
    assert published_bank(1, 7)[0, 0].sum().item() == pytest.approx(49.0, rel=1e-6)  # the blob alone
    with pytest.raises(ValueError, match="n_filters: expected an int >= 1, got 0"):
        published_bank(0)
    with pytest.raises(ValueError, match="size: expected an odd int >= 3, got 6"):
        published_bank(25, 6)


def test_model_init_as_published(monkeypatch):
    calls = []
    real = torch.nn.init.xavier_normal_
    monkeypatch.setattr(torch.nn.init, "xavier_normal_", lambda t, *a, **k: calls.append(t) or real(t, *a, **k))
    model = PathfinderHGRU("segmentation", 25, 15, steps=2, backend="torch", conv="direct")
    assert torch.equal(model.conv0.weight.detach(), published_bank(25, 7))
    # conv0's bias stays at torch's default init, U(-1/sqrt(49), 1/sqrt(49)), as the published model keeps it.
    bias = model.conv0.bias.detach()
    assert bias.abs().max() <= 1 / 7 and bias.abs().min() > 0 and bias.std() > 0.02
    assert len(calls) == 1 and calls[0] is model.readout.weight
    torch.testing.assert_close(model.readout.bias.detach(), torch.full((2,), math.log(99.0)))
    # The blob makes plain brightness drive the cell: a uniform image excites channel 24 only.
    x = model.drive(torch.ones(1, 1, 21, 21))[0, :, 10, 10]
    torch.testing.assert_close(x, (model.conv0.weight.sum((1, 2, 3)) + model.conv0.bias).pow(2).detach())
    assert x[24] > 2000 and x[:24].max() < 0.1


def test_model_earlier_init_by_name():
    model = PathfinderHGRU("segmentation", 8, 3, steps=2, backend="torch", conv0_bank="zero_mean", readout_init="torch")
    assert torch.equal(model.conv0.weight.detach(), gabor_bank(8, 7))
    assert torch.count_nonzero(model.conv0.bias) == 0
    assert model.readout.bias.abs().max() < 1  # torch's default init, not log(99)
    assert model.config["conv0_bank"] == "zero_mean" and model.config["readout_init"] == "torch"


@pytest.mark.parametrize("kwargs, match", [
    (dict(conv0_bank="gabor"), "conv0_bank: expected one of"),
    (dict(readout_init="zeros"), "readout_init: expected one of"),
    (dict(adjoint_rule="never"), "adjoint_rule: expected one of"),
    (dict(adjoint_solver="cg"), "adjoint_solver: expected one of"),
    (dict(adjoint_rule="published", adjoint_solver="anderson"), "adjoint_rule: 'published' applies to"),
])
def test_model_bad_options_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PathfinderHGRU("segmentation", 4, 3, steps=2, backend="torch", **kwargs)


# --- the adjoint rule, reachable from the model ------------------------------------------------

def published_rbp_gradients(model, images, target, scale, truncate_iter=15):
    """Parameter gradients of the published training step (grad_method 'rbp'), restated.

    N - 1 steps without graph, one tracked step from the detached state, then the published
    backward: the Neumann series on J^T with its stops (||g|| > 1, ||v|| grows, ||v|| < 1e-9;
    the last term is dropped), then one backward through the tracked step with g.
    """
    model.zero_grad(set_to_none=True)
    x = model.conv0(images).pow(2)
    h = torch.zeros_like(x)
    with torch.no_grad():
        for _ in range(model.steps - 1):
            h = model.cell(x, h)
    prev = h.detach().requires_grad_(True)
    last = model.cell(x, prev)
    y = last.detach().requires_grad_(True)
    loss = scale * focal_loss(model.head(y), target)
    (grad,) = torch.autograd.grad(loss, y, retain_graph=True)
    loss.backward()  # the readout's gradients
    g_prev, v_prev, norms_v = grad.clone(), grad.clone(), [grad.norm()]
    g = g_prev
    for _ in range(truncate_iter):
        (v,) = torch.autograd.grad(last, prev, grad_outputs=v_prev, retain_graph=True)
        g = g_prev + v
        if g.norm() > 1 or v.norm() > norms_v[-1] or v.norm() < 1e-9:
            g = g_prev
            break
        v_prev, g_prev = v, g
        norms_v.append(v.norm())
    last.backward(g)
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("scale", [1.0, 1e3], ids=["scale1", "scale1e3"])
def test_model_published_adjoint_rule_matches_the_published_backward(scale):
    torch.manual_seed(0)
    model = PathfinderHGRU("segmentation", 4, 3, steps=5, algorithm="rbp", backend="torch", conv="direct",
                           adjoint_rule="published").double()
    images = torch.rand(2, 1, 12, 12, dtype=torch.float64)
    target = (torch.rand(2, 12, 12) > 0.7).long()
    expected = published_rbp_gradients(model, images, target, scale)
    model.zero_grad(set_to_none=True)
    out = model(images)
    (scale * focal_loss(out.logits, target)).backward()
    assert out.stats.adjoint_stop in ("published", "max_steps") and out.stats.adjoint_iterations >= 1
    got = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-14, msg=name)
    # The relative rule (the default) runs on where the published one stopped, and the gradients differ.
    model.adjoint_rule = "relative"
    model.zero_grad(set_to_none=True)
    out_rel = model(images)
    (scale * focal_loss(out_rel.logits, target)).backward()
    assert out_rel.stats.adjoint_iterations > out.stats.adjoint_iterations
    diff = (model.cell.w_gate_exc.grad - expected["cell.w_gate_exc"]).norm() / expected["cell.w_gate_exc"].norm()
    assert diff > 1e-6  # far above the 1e-10 agreement above (measured: 5.6e-5 at scale 1, 3.7e-3 at 1e3)
    if scale == 1e3:
        assert out.stats.adjoint_iterations == 1  # ||g|| > 1 at once: the published rule's absolute test


# --- checkpoints of the published training script ----------------------------------------------

def published_layout(channels=25, k=15, seed=0) -> dict:
    """A state dict with the published hConvGRU's keys and shapes (written here, not by this package)."""
    g = torch.Generator().manual_seed(seed)
    c = channels
    shapes = {
        "conv0.weight": (c, 1, 7, 7), "conv0.bias": (c,),
        "unit1.u1_gate.weight": (c, c, 1, 1), "unit1.u1_gate.bias": (c,),
        "unit1.u2_gate.weight": (c, c, 1, 1), "unit1.u2_gate.bias": (c,),
        "unit1.w_gate_inh": (c, c, k, k), "unit1.w_gate_exc": (c, c, k, k),
        **{f"unit1.{n}": (c, 1, 1) for n in ("alpha", "gamma", "kappa", "w", "mu")},
        **{f"unit1.bn.{i}.{n}": (c,) for i in range(4) for n in ("weight", "bias")},
        "bn.weight": (c,), "bn.bias": (c,), "conv6.weight": (2, c, 1, 1), "conv6.bias": (2,),
    }
    # Small positive values keep the recurrence finite whatever the seed.
    return {name: 0.1 * torch.rand(shape, generator=g) for name, shape in shapes.items()}


def as_written(state: dict, prefix: str = "module.") -> dict:
    """The published script's save: DataParallel's prefix and its wrapper dict."""
    return {"epoch": 19, "state_dict": {prefix + k: v for k, v in state.items()}, "best_prec1": 0.9512}


OURS = {"conv0.": "conv0.", "unit1.": "cell.", "bn.": "readout_norm.", "conv6.": "readout."}


def ours(name: str) -> str:
    prefix = next(p for p in OURS if name.startswith(p))
    return OURS[prefix] + name[len(prefix):]


def test_published_checkpoint_reads_and_loads_strictly(tmp_path):
    state = published_layout()
    path = tmp_path / "model_fscore_9512_epoch_19_checkpoint.pth.tar"
    torch.save(as_written(state), path)
    with pytest.raises(CheckpointError, match="checkpoint of the published Pathfinder code"):
        read_checkpoint(path)  # a trainer resume must not take it for its own
    ckpt = read_checkpoint(path, published=True)
    assert ckpt["format"] == PUBLISHED_FORMAT and ckpt["epoch"] == 19 and ckpt["best_prec1"] == 0.9512
    model = PathfinderHGRU.from_published(path, steps=6, backend="torch")
    own = model.state_dict()
    assert set(ckpt["model"]) == set(own)
    used = {k: v for k, v in state.items() if not k.startswith(("unit1.bn.0.", "unit1.bn.2."))}
    assert {ours(k) for k in used} == set(own)
    for name, value in used.items():
        assert torch.equal(own[ours(name)], value), name  # identical tensors
        assert torch.equal(ckpt["model"][ours(name)], value), name
    assert model.steps == 6 and model.config["channels"] == 25 and model.config["kernel_size"] == 15


@pytest.mark.parametrize("form", ["wrapper-no-prefix", "bare-prefixed", "bare", "loaded-dict"])
def test_published_checkpoint_forms(form):
    state = published_layout(channels=4, k=3, seed=1)
    obj = {"wrapper-no-prefix": as_written(state, prefix=""), "bare-prefixed": as_written(state)["state_dict"],
           "bare": state, "loaded-dict": as_written(state)}[form]
    model = PathfinderHGRU.from_published(obj, steps=3, backend="torch", algorithm="rbp", adjoint_rule="published")
    assert torch.equal(model.cell.w_gate_exc.detach(), state["unit1.w_gate_exc"])
    assert torch.equal(model.readout.weight.detach(), state["conv6.weight"])
    assert model.adjoint_rule == "published" and model.algorithm == "rbp"
    out = model(torch.rand(2, 1, 10, 10))
    assert out.logits.shape == (2, 2, 10, 10) and torch.isfinite(out.logits).all()


def test_published_checkpoint_errors(tmp_path):
    state = published_layout(channels=4, k=3)
    with pytest.raises(PublishedCheckpointError, match=r"key 'module\.head\.weight' is not a parameter"):
        PathfinderHGRU.from_published({**as_written(state)["state_dict"], "module.head.weight": torch.ones(1)}, steps=2)
    bad = {**state, "conv0.weight": torch.zeros(5, 1, 7, 7)}
    with pytest.raises(PublishedCheckpointError, match=r"conv0\.weight \(5, 1, 7, 7\) \(model \(4, 1, 7, 7\)\)"):
        PathfinderHGRU.from_published(bad, steps=2)
    with pytest.raises(TypeError, match="channels: comes from the checkpoint"):
        PathfinderHGRU.from_published(state, steps=2, channels=8)
    with pytest.raises(PublishedCheckpointError, match="does not exist"):
        PathfinderHGRU.from_published(tmp_path / "none.pth.tar", steps=2)
    with pytest.raises(PublishedCheckpointError, match="expected the published training script's dict"):
        PathfinderHGRU.from_published({"epoch": 1, "state_dict": [1, 2]}, steps=2)
