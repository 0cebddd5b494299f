"""ConvGRUCell and ConvLSTMCell: the restated equations, the common parameter names, every
algorithm of fixed_point, and the Pathfinder model / diagnose with a tuple-state cell."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from crbp_fast import ENGINE_ALGORITHMS, ConvGRUCell, ConvLSTMCell, fixed_point

DT = torch.float64


def gru_equations(cell, x, h):
    k = cell.kernel_size // 2
    s = torch.cat([x, h], 1)
    z = torch.sigmoid(F.conv2d(s, cell.update_gate.weight, cell.update_gate.bias, padding=k))
    r = torch.sigmoid(F.conv2d(s, cell.reset_gate.weight, cell.reset_gate.bias, padding=k))
    n = torch.tanh(F.conv2d(torch.cat([x, r * h], 1), cell.out_gate.weight, cell.out_gate.bias, padding=k))
    return (1 - z) * h + z * n


def lstm_equations(cell, x, h, c):
    """Shi et al.'s ConvLSTM without peepholes, each gate's conv restated from its weight rows."""
    k, d = cell.kernel_size // 2, cell.hidden_dim
    w, b = cell.conv.weight, cell.conv.bias
    s = torch.cat([x, h], 1)

    def gate(j):
        return F.conv2d(s, w[j * d:(j + 1) * d], b[j * d:(j + 1) * d], padding=k)

    i, f, o, g = torch.sigmoid(gate(0)), torch.sigmoid(gate(1)), torch.sigmoid(gate(2)), torch.tanh(gate(3))
    c2 = f * c + i * g
    return o * torch.tanh(c2), c2


def test_parameter_names_are_those_of_the_common_implementations():
    gru, lstm = ConvGRUCell(3, 4, 5), ConvLSTMCell(3, 4, 5)
    assert {n: tuple(p.shape) for n, p in gru.named_parameters()} == {
        "reset_gate.weight": (4, 7, 5, 5), "reset_gate.bias": (4,), "update_gate.weight": (4, 7, 5, 5),
        "update_gate.bias": (4,), "out_gate.weight": (4, 7, 5, 5), "out_gate.bias": (4,)}
    assert {n: tuple(p.shape) for n, p in lstm.named_parameters()} == {"conv.weight": (16, 7, 5, 5), "conv.bias": (16,)}
    assert all(float(gru.get_parameter(f"{g}.bias").detach().abs().max()) == 0 for g in ("reset_gate", "update_gate", "out_gate"))
    assert ConvLSTMCell(3, 4, 3, forget_bias=1.0).conv.bias[4:8].mean() > 0.5


def test_cells_equal_the_restated_equations():
    torch.manual_seed(0)
    x, h, c = torch.randn(2, 3, 7, 6, dtype=DT), torch.randn(2, 4, 7, 6, dtype=DT), torch.randn(2, 4, 7, 6, dtype=DT)
    gru = ConvGRUCell(3, 4, 3).double()
    torch.testing.assert_close(gru(x, h), gru_equations(gru, x, h), rtol=1e-14, atol=1e-14)
    lstm = ConvLSTMCell(3, 4, 3).double()
    for got, want in zip(lstm(x, (h, c)), lstm_equations(lstm, x, h, c)):
        torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
    h0, c0 = lstm.init_state(x)
    assert h0.shape == c0.shape == (2, 4, 7, 6) and not h0.any() and not c0.any()
    assert gru.init_state(x).shape == (2, 4, 7, 6)


def test_cell_argument_errors():
    with pytest.raises(ValueError, match="kernel_size: expected an odd int"):
        ConvGRUCell(3, 4, 4)
    with pytest.raises(ValueError, match="hidden_dim: expected an int >= 1, got 0"):
        ConvLSTMCell(3, 0)
    lstm = ConvLSTMCell(3, 4)
    x = torch.randn(1, 3, 5, 5)
    with pytest.raises(ValueError, match=r"x: expected shape \(B, 3, H, W\), got \(1, 2, 5, 5\)"):
        lstm(torch.randn(1, 2, 5, 5), lstm.init_state(x))
    with pytest.raises(ValueError, match=r"state: expected a pair \(h, c\) of shape \(1, 4, 5, 5\) each, got \[\(1, 4, 5, 5\)\]"):
        lstm(x, (torch.zeros(1, 4, 5, 5),))


_SETUPS: dict = {}


def _setup(kind):
    """A small contractive cell of each kind, its drive, and the reference gradient: BPTT through
    80 steps, which has converged to the implicit one (computed once per kind)."""
    if kind not in _SETUPS:
        torch.manual_seed(1)
        cell = (ConvGRUCell(2, 3, 3) if kind == "convgru" else ConvLSTMCell(2, 3, 3)).double()
        with torch.no_grad():  # contractive: small recurrent weights
            for p in cell.parameters():
                p.mul_(0.25)
        x = torch.randn(2, 2, 6, 6, dtype=DT, requires_grad=True)
        ref_state = fixed_point(cell, x, steps=80, algorithm="bptt").state
        ref = torch.autograd.grad(_loss(ref_state), [x, *cell.parameters()])
        _SETUPS[kind] = cell, x, ref
    return _SETUPS[kind]


def _loss(state):
    h = state if isinstance(state, torch.Tensor) else state[0]
    return (h * torch.linspace(-1, 1, h.numel(), dtype=DT).reshape(h.shape)).sum()


@pytest.mark.parametrize("kind", ["convgru", "convlstm"])
@pytest.mark.parametrize("algorithm", ENGINE_ALGORITHMS)
def test_every_algorithm_runs_and_matches_the_converged_gradient(kind, algorithm):
    cell, x, ref = _setup(kind)
    loss = _loss
    # phantom: 30 steps without graph to the fixed point, then 40 tracked (a Neumann series of 40 terms).
    kw = dict(steps=70, phantom_steps=40, phantom_damping=1.0) if algorithm == "phantom" else dict(steps=40)
    res = fixed_point(cell, x, algorithm=algorithm, adjoint_steps=200, adjoint_tol=1e-13, lcp_target=50.0, **kw)
    assert isinstance(res.state, tuple) == (kind == "convlstm")
    assert res.stats.max_forward_residual < 1e-8, res.stats.max_forward_residual
    assert (res.penalty is not None) == (algorithm in ("cbptt", "crbp"))
    if res.penalty is not None:
        assert float(res.penalty.detach()) == 0.0  # target 50 is above every column sum
    grads = torch.autograd.grad(loss(res.state), [x, *cell.parameters()])
    # One absolute scale for all: at the fixed point some gradients are exactly 0 (ConvGRU's update
    # gate: its candidate equals h there), which 40 steps of BPTT reach only to ~1e-9.
    scale = max(float(r.abs().max()) for r in ref)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6 * scale)


def test_pathfinder_model_with_a_convlstm_trains_and_diagnoses(tmp_path):
    from crbp_fast.tasks.pathfinder.diagnose import diagnose
    from crbp_fast.models import PathfinderHGRU
    from crbp_fast.tasks.pathfinder.train import TrainConfig, train

    model = PathfinderHGRU("segmentation", channels=3, kernel_size=3, steps=3, algorithm="crbp", cell="convlstm")
    out = model(torch.rand(2, 1, 16, 16))
    assert out.logits.shape == (2, 2, 16, 16) and out.penalty is not None
    states = list(model.trajectory(torch.rand(2, 1, 16, 16), 2))
    assert len(states) == 2 and isinstance(states[0], tuple) and len(states[0]) == 2
    config = TrainConfig(task="segmentation", length=4, size=32, channels=4, kernel_size=3, steps=3, batch_size=4,
                         iterations=2, eval_size=0, out=str(tmp_path / "lstm"), progress=False, threads=1,
                         algorithm="crbp", cell="convlstm")
    train(config)
    summary = diagnose([str(tmp_path / "lstm" / "checkpoint.pt")], test_steps=5, out=tmp_path / "diag", n_images=4,
                       batch_size=4, pca_images=2)
    (entry,) = summary["checkpoints"]
    assert entry["cell"] == "convlstm" and len(entry["pca"]["points"]) == 5
    assert len(entry["distance"]["values"]) == 4 and min(entry["distance"]["values"]) >= 0
    assert len(entry["forward_trace"]) == 5 and len(entry["forward_trace"][0]) == 4
    assert (tmp_path / "diag" / "forward_trace.png").stat().st_size > 1000
    assert (tmp_path / "diag" / "state_space.png").exists()
