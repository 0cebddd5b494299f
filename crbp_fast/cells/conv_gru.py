"""ConvGRU cell (Ballas et al. 2016, "Delving deeper into convolutional networks for learning
video representations"), with the parameter names of the common PyTorch implementation.

    s = cat([x, h])
    z = sigma(update_gate(s))                       # update gate
    r = sigma(reset_gate(s))                        # reset gate
    n = tanh(out_gate(cat([x, r * h])))             # candidate
    F(x, h) = (1 - z) * h + z * n
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor


def _check_size(arg: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{arg}: expected an int >= 1, got {value!r}")
    return value


class ConvGRUCell(nn.Module):
    """One ConvGRU step ``h' = F(x, h)`` on (B, C, H, W) maps, 'same' zero padding.

    Args:
        input_size: channels of x.
        hidden_size: channels of h.
        kernel_size: odd k of the three k x k convs (``reset_gate``, ``update_gate``,
            ``out_gate``, each ``Conv2d(input_size + hidden_size, hidden_size, k, padding=k // 2)``).
        bias: conv biases.

    Initialisation as the common implementation: orthogonal conv weights, zero biases.

    Example:
        >>> cell = ConvGRUCell(8, 16, 3)
        >>> res = fixed_point(cell, x, steps=20, algorithm="crbp")   # x (B, 8, H, W), h0 zeros (B, 16, H, W)
    """

    def __init__(self, input_size: int, hidden_size: int, kernel_size: int = 3, bias: bool = True):
        super().__init__()
        self.input_size = _check_size("input_size", input_size)
        self.hidden_size = _check_size("hidden_size", hidden_size)
        k = _check_size("kernel_size", kernel_size)
        if k % 2 == 0:
            raise ValueError(f"kernel_size: expected an odd int (a 'same' padded conv), got {kernel_size!r}")
        self.kernel_size = k
        cin = input_size + hidden_size
        self.reset_gate = nn.Conv2d(cin, hidden_size, k, padding=k // 2, bias=bias)
        self.update_gate = nn.Conv2d(cin, hidden_size, k, padding=k // 2, bias=bias)
        self.out_gate = nn.Conv2d(cin, hidden_size, k, padding=k // 2, bias=bias)
        for conv in (self.reset_gate, self.update_gate, self.out_gate):
            nn.init.orthogonal_(conv.weight)
            if bias:
                nn.init.zeros_(conv.bias)

    def init_state(self, x: Tensor) -> Tensor:
        """The zero state for drive x: (B, hidden_size, H, W)."""
        self._check_x(x)
        return x.new_zeros(x.shape[0], self.hidden_size, *x.shape[2:])

    def _check_x(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.input_size:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x: expected shape (B, {self.input_size}, H, W), got {got}")

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        self._check_x(x)
        if not isinstance(h, Tensor) or h.shape != (x.shape[0], self.hidden_size, *x.shape[2:]):
            got = tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__
            raise ValueError(f"h: expected shape {(x.shape[0], self.hidden_size, *x.shape[2:])}, got {got}")
        stacked = torch.cat([x, h], dim=1)
        update = torch.sigmoid(self.update_gate(stacked))
        reset = torch.sigmoid(self.reset_gate(stacked))
        candidate = torch.tanh(self.out_gate(torch.cat([x, h * reset], dim=1)))
        return h * (1 - update) + candidate * update

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, kernel_size={self.kernel_size}"
