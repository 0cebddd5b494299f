"""Every bad input raises the named error with a message naming the argument."""

from __future__ import annotations

import pytest
import torch

from crbp_fast import HGRUCell, fixed_point, lcp_penalty


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(channels=0, kernel_size=3), ValueError, "channels"),
        (dict(channels=2.5, kernel_size=3), ValueError, "channels"),
        (dict(channels=4, kernel_size=4), ValueError, "kernel_size.*odd"),
        (dict(channels=4, kernel_size=0), ValueError, "kernel_size"),
        (dict(channels=4, kernel_size=-3), ValueError, "kernel_size"),
        (dict(channels=4, kernel_size=3, norm="layer"), ValueError, "norm.*'layer'"),
        (dict(channels=4, kernel_size=3, backend="cuda"), ValueError, "backend.*'cuda'"),
        (dict(channels=4, kernel_size=3, conv="winograd"), ValueError, "conv.*'winograd'"),
        (dict(channels=4, kernel_size=3, gate_bias_init="zero"), ValueError, "gate_bias_init"),
        (dict(channels=4, kernel_size=3, norm="group", norm_groups=3), ValueError, "norm_groups"),
        (dict(channels=4, kernel_size=3, dtype=torch.int32), TypeError, "dtype"),
    ],
    ids=lambda v: str(v) if not isinstance(v, dict) else "-".join(f"{k}={v[k]}" for k in v),
)
def test_cell_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        HGRUCell(**kwargs)


@pytest.mark.parametrize(
    "x, h, error, match",
    [
        (torch.randn(2, 3, 5, 5), None, ValueError, r"x: expected shape \(B, 4, H, W\).*got \(2, 3, 5, 5\)"),
        (torch.randn(4, 5, 5), None, ValueError, "x: expected shape"),
        (torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 6), ValueError, r"h: expected the shape of x"),
        (torch.randint(0, 3, (2, 4, 5, 5)), None, TypeError, "x: expected a floating dtype, got torch.int64"),
        (torch.randn(2, 4, 5, 5, dtype=torch.float64), None, TypeError, "x: has dtype torch.float64"),
        (torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5, dtype=torch.float64), TypeError, "h: expected the dtype of x"),
        ([[1.0]], None, TypeError, "x: expected a torch.Tensor"),
    ],
    ids=["channels", "rank", "h-shape", "int-dtype", "dtype-vs-params", "h-dtype", "not-tensor"],
)
def test_cell_input_errors(x, h, error, match):
    cell = HGRUCell(4, 3)
    with pytest.raises(error, match=match):
        cell(x, h)
    with pytest.raises(error, match=match):
        fixed_point(cell, x, h, steps=2)


def test_device_mismatch_is_named():
    cell = HGRUCell(4, 3).to("meta")
    with pytest.raises(ValueError, match="x: is on device cpu but the cell's parameters are on meta"):
        cell(torch.randn(2, 4, 5, 5))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(steps=0), ValueError, "steps: expected an int >= 1, got 0"),
        (dict(steps=2.0), ValueError, "steps"),
        (dict(algorithm="adam"), ValueError, "algorithm: expected one of .*got 'adam'"),
        (dict(solver="newton"), ValueError, "solver: expected one of"),
        (dict(adjoint_solver="gmres"), ValueError, "adjoint_solver: expected one of"),
        (dict(adjoint_rule="never"), ValueError, "adjoint_rule"),
        (dict(adjoint_steps=-1), ValueError, "adjoint_steps"),
        (dict(adjoint_tol=-1e-3), ValueError, "adjoint_tol"),
        (dict(adjoint_tol="small"), TypeError, "adjoint_tol"),
        (dict(anderson_damping=1.5), ValueError, "anderson_damping"),
        (dict(lcp_target="high"), TypeError, "lcp_target"),
        (dict(solver="anderson", algorithm="bptt"), ValueError, "solver: 'anderson'.*rbp"),
    ],
    ids=lambda v: "-".join(f"{k}={v[k]}" for k in v) if isinstance(v, dict) else "",
)
def test_fixed_point_argument_errors(kwargs, error, match):
    cell = HGRUCell(4, 3)
    with pytest.raises(error, match=match):
        fixed_point(cell, torch.randn(2, 4, 5, 5), **kwargs)


def test_fixed_point_rejects_non_module_and_non_tensor():
    with pytest.raises(TypeError, match="f: expected a module"):
        fixed_point(3, torch.randn(2, 2))
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        fixed_point(HGRUCell(4, 3), "image")
    with pytest.raises(TypeError, match="h0: expected a torch.Tensor or None"):
        fixed_point(HGRUCell(4, 3), torch.randn(2, 4, 5, 5), h0=[0.0])


def test_lcp_penalty_argument_errors():
    cell = HGRUCell(4, 3)
    x = torch.randn(2, 4, 5, 5)
    with pytest.raises(TypeError, match="target"):
        lcp_penalty(cell, x, x, target="x")
    with pytest.raises(TypeError, match="h: expected a floating"):
        lcp_penalty(cell, x, x.long())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(eps=0.0), ValueError, "eps: expected a finite number > 0.*got 0.0"),
        (dict(eps=-1e-3), ValueError, "eps: expected a finite number > 0.*got -0.001"),
        (dict(eps=float("nan")), ValueError, "eps: expected a finite number > 0"),
        (dict(eps="1e-3"), ValueError, "eps: expected a finite number > 0.*got '1e-3'"),
        (dict(dtype="float64"), TypeError, "dtype: expected a floating torch.dtype.*got 'float64'"),
        (dict(device="gpu0"), ValueError, "device: expected a torch.device.*got 'gpu0'"),
    ],
    ids=["eps-0", "eps-neg", "eps-nan", "eps-str", "dtype-str", "device-name"],
)
def test_cell_argument_kinds(kwargs, error, match):
    with pytest.raises(error, match=match):
        HGRUCell(4, 3, **kwargs)


def test_meta_cell_is_refused_when_run():
    cell = HGRUCell(4, 3, device="meta")  # constructing on meta (deferred init) is fine
    with pytest.raises(ValueError, match="x: is on device meta, where the cell cannot run"):
        cell(torch.randn(2, 4, 5, 5, device="meta"))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_needs_more_than_one_value_per_channel_in_train_and_eval(training):
    cell = HGRUCell(4, 3, backend="torch").train(training)
    with pytest.raises(ValueError, match=r"norm='batch'.*one value per channel, got shape \(1, 4, 1, 1\)"):
        cell(torch.randn(1, 4, 1, 1))
    HGRUCell(4, 3, norm="group", backend="torch").train(training)(torch.randn(1, 4, 1, 1))  # per-sample stats are fine
    with pytest.raises(ValueError, match="norm='group' with 4 groups of 1 channel"):
        HGRUCell(4, 3, norm="group", norm_groups=4, backend="torch")(torch.randn(2, 4, 1, 1))
