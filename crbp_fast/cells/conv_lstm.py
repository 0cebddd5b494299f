"""ConvLSTM cell (Shi et al. 2015, "Convolutional LSTM network"), without peepholes, with the
parameter names of the common PyTorch implementation. The state is the pair (h, c).

    i, f, o, g = split(conv(cat([x, h])), hidden_dim)      # one conv, 4 * hidden_dim channels
    i, f, o = sigma(i), sigma(f), sigma(o);  g = tanh(g)
    c' = f * c + i * g
    h' = o * tanh(c')
    F(x, (h, c)) = (h', c')
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .conv_gru import _check_size


class ConvLSTMCell(nn.Module):
    """One ConvLSTM step ``(h', c') = F(x, (h, c))`` on (B, C, H, W) maps, 'same' zero padding.

    Args:
        input_dim: channels of x.
        hidden_dim: channels of h and of c.
        kernel_size: odd k of ``conv`` (``Conv2d(input_dim + hidden_dim, 4 * hidden_dim, k,
            padding=k // 2)``), whose output channels are the gates i, f, o, g in that order.
        bias: conv bias.
        forget_bias: added to the forget gate's bias at initialisation (0: torch's default init
            as the common implementation; 1 is the usual LSTM choice).

    The state is a tuple, so :func:`crbp_fast.engine.fixed_point` runs, differentiates and reports on
    both tensors; ``init_state(x)`` is the zero pair.

    Example:
        >>> cell = ConvLSTMCell(8, 16, 3)
        >>> h, c = fixed_point(cell, x, steps=20, algorithm="crbp").state
    """

    def __init__(self, input_dim: int, hidden_dim: int, kernel_size: int = 3, bias: bool = True,
                 forget_bias: float = 0.0):
        super().__init__()
        self.input_dim = _check_size("input_dim", input_dim)
        self.hidden_dim = _check_size("hidden_dim", hidden_dim)
        k = _check_size("kernel_size", kernel_size)
        if k % 2 == 0:
            raise ValueError(f"kernel_size: expected an odd int (a 'same' padded conv), got {kernel_size!r}")
        self.kernel_size = k
        self.conv = nn.Conv2d(input_dim + hidden_dim, 4 * hidden_dim, k, padding=k // 2, bias=bias)
        if bias and forget_bias:
            with torch.no_grad():
                self.conv.bias[hidden_dim:2 * hidden_dim] += float(forget_bias)

    def init_state(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The zero state (h, c) for drive x, each (B, hidden_dim, H, W)."""
        self._check_x(x)
        shape = (x.shape[0], self.hidden_dim, *x.shape[2:])
        return x.new_zeros(shape), x.new_zeros(shape)

    def _check_x(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.input_dim:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x: expected shape (B, {self.input_dim}, H, W), got {got}")

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        self._check_x(x)
        shape = (x.shape[0], self.hidden_dim, *x.shape[2:])
        if (not isinstance(state, (tuple, list)) or len(state) != 2
                or not all(isinstance(s, Tensor) and s.shape == shape for s in state)):
            got = ([tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__ for s in state]
                   if isinstance(state, (tuple, list)) else type(state).__name__)
            raise ValueError(f"state: expected a pair (h, c) of shape {shape} each, got {got}")
        h, c = state
        gates = self.conv(torch.cat([x, h], dim=1))
        cc_i, cc_f, cc_o, cc_g = torch.split(gates, self.hidden_dim, dim=1)
        i, f, o, g = torch.sigmoid(cc_i), torch.sigmoid(cc_f), torch.sigmoid(cc_o), torch.tanh(cc_g)
        c_next = f * c + i * g
        h_next = o * torch.tanh(c_next)
        return h_next, c_next

    def extra_repr(self) -> str:
        return f"{self.input_dim}, {self.hidden_dim}, kernel_size={self.kernel_size}"
