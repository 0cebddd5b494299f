"""Standard recurrent vision cells with the engine's signature ``f(x, state) -> state``.

- :class:`ConvGRUCell`: state h (B, hidden, H, W); parameters ``reset_gate``, ``update_gate``,
  ``out_gate`` (as the common PyTorch ConvGRU implementations name them).
- :class:`ConvLSTMCell`: state (h, c), two tensors; one ``conv`` over cat([x, h]) producing the
  four gates i, f, o, g (as the common PyTorch ConvLSTM implementations).

Both are plain PyTorch (the reference math is the module itself) and run with every algorithm
of :func:`crbp_fast.engine.fixed_point`; ``init_state(x)`` gives the zero state fixed_point starts from.
"""

from .conv_gru import ConvGRUCell
from .conv_lstm import ConvLSTMCell

#: Cell names accepted where a model chooses its recurrent cell (the Pathfinder model, the trainer).
STANDARD_CELLS = ("convgru", "convlstm")

__all__ = ["STANDARD_CELLS", "ConvGRUCell", "ConvLSTMCell"]
