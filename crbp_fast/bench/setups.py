"""Set-up factories shared by the benchmark CLI, its memory child processes and ``benchmarks/``.

One place builds the cell, the inputs and the closures that are timed or profiled, so that the
speed run, the memory run and the pytest-benchmark suites measure the same thing:

- :func:`step_fn`: one no-grad step F(x, h) at a state h near the fixed point;
- :func:`vjp_fn`: one adjoint product J^T v from ``cell.linearize(x, h)`` taken once;
- :func:`train_iteration_fn`: one training iteration: ``fixed_point`` with N forward steps,
  loss = mean(h_N^2) (+ 10 x LCP for cbptt / crbp, the published weight), backward;
- :func:`conv_fn`: one k x k correlation (or its transpose) of a conv engine.

Also the presets (``PRESETS``: quick and paper), the :class:`Sweep` a CLI run measures, and the
check that a backend / conv engine pair runs here at all (:func:`runnable_engines`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor
from tqdm import tqdm

from ..conv import engines as conv_engines
from ..engine.fixed_point import ALGORITHMS, FixedPointStats, fixed_point
from ..hgru import HGRUCell
from ..hgru.backends import BACKEND_NAMES, resolve_backend

#: Concrete backends and conv engines a sweep tries by default ("auto" resolves to one of them).
SWEEP_BACKENDS = tuple(b for b in BACKEND_NAMES if b != "auto")
SWEEP_CONVS = tuple(c for c in conv_engines.CONV_NAMES if c != "auto")
#: Weight of the LCP penalty in the loss of the published Pathfinder runs.
PENALTY_WEIGHT = 10.0
#: No-grad steps from h = 0 to the state at which steps and VJPs are timed.
SETTLE_STEPS = 10


class Unavailable(Exception):
    """A backend or conv engine that cannot run here; the message says why."""


@dataclass(frozen=True)
class Shape:
    """(B, C, H, W) of the drive and the state, and the horizontal kernel size k."""

    batch: int
    channels: int
    height: int
    width: int
    kernel_size: int

    @property
    def id(self) -> str:
        return f"B{self.batch}-C{self.channels}-H{self.height}-W{self.width}-k{self.kernel_size}"

    @property
    def tensor_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.channels, self.height, self.width)

    def check(self) -> None:
        """Raise ``ValueError`` (naming the argument) when the cell would reject this shape."""
        for name in ("batch", "channels", "height", "width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        cell = HGRUCell(self.channels, self.kernel_size, backend="torch", conv="direct")
        # A zero-stride view has the shape without its memory: the paper shape costs nothing.
        probe = torch.zeros(1).expand(*self.tensor_shape)
        cell.check_inputs(probe, probe)


#: Presets of the CLI and of ``benchmarks/`` (the paper's shape is meant for a GPU).
QUICK_SHAPE = Shape(batch=2, channels=8, height=32, width=32, kernel_size=5)
PAPER_SHAPE = Shape(batch=32, channels=25, height=150, width=150, kernel_size=15)


@dataclass(frozen=True)
class Preset:
    """Defaults of a sweep; ``threads`` None keeps torch's default."""

    shape: Shape
    steps: tuple[int, ...]
    speed_steps: tuple[int, ...]
    adjoint_steps: int
    repeats: int
    warmup: int
    threads: int | None
    compile: bool
    convs: tuple[str, ...]
    rss_jobs: int


PRESETS = {
    # Small enough for about a minute on 2 cores. One thread: the small shape gains nothing from
    # more, and on a shared machine spinning OpenMP threads made a step 50x slower. The direct
    # conv only: the FFT engine is for k = 15, not the quick k = 5. torch.compile alone takes
    # ~40 s on 2 cores, so it is off. Two RSS children at a time (one thread each).
    "quick": Preset(
        shape=QUICK_SHAPE, steps=(1, 2, 5, 10, 20, 40), speed_steps=(5, 20), adjoint_steps=15, repeats=5,
        warmup=1, threads=1, compile=False, convs=("direct",), rss_jobs=2,
    ),
    # The published Pathfinder set-up; bptt at N=80 may not fit a GPU (an out_of_memory row).
    "paper": Preset(
        shape=PAPER_SHAPE, steps=(1, 5, 10, 20, 40, 80), speed_steps=(20, 80), adjoint_steps=15, repeats=10,
        warmup=2, threads=None, compile=True, convs=SWEEP_CONVS, rss_jobs=1,
    ),
}


def resolve_device(name: str | None) -> torch.device:
    """``None`` -> CUDA when present, else CPU; ``ValueError`` for a device that is not here."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device: {name!r} was asked for, but this torch ({torch.__version__}) sees no CUDA device"
            )
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ValueError(f"device: {name!r} was asked for, but there are {torch.cuda.device_count()} CUDA devices")
        device = torch.device("cuda", index)
    return device


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is the allocator running out: CUDA's OOM error, or the CPU allocator's."""
    return isinstance(err, (MemoryError, torch.cuda.OutOfMemoryError)) or "can't allocate memory" in str(err)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_inputs(shape: Shape, device: torch.device, seed: int = 0) -> Tensor:
    """A non-negative drive x of ``shape`` (like the squared Gabor responses of Pathfinder)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape.tensor_shape, generator=gen).square().to(device)


def make_cell(shape: Shape, backend: str, conv: str, device: torch.device, seed: int = 0) -> HGRUCell:
    """The hGRU cell of ``shape`` with the published init (seeded), in training mode."""
    torch.manual_seed(seed)
    return HGRUCell(shape.channels, shape.kernel_size, backend=backend, conv=conv).to(device).train()


def resolve_engines(backend: str, conv: str, shape: Shape, device: torch.device) -> tuple[str, str]:
    """The (backend, conv) names that run for the requested ones; :class:`Unavailable` if one cannot."""
    try:
        backend_name = resolve_backend(backend, device).name
    except (RuntimeError, ImportError) as err:
        raise Unavailable(str(err)) from None
    probe = torch.zeros(1, device=device).expand(*shape.tensor_shape)
    try:
        conv_name = conv_engines.resolve_conv(conv, probe, shape.kernel_size).name
    except (RuntimeError, NotImplementedError, ImportError) as err:
        raise Unavailable(str(err)) from None
    return backend_name, conv_name


def settled_state(cell: HGRUCell, x: Tensor, steps: int = SETTLE_STEPS) -> Tensor:
    """The state after ``steps`` no-grad steps from zero: near h*, where steps and VJPs are timed."""
    with torch.no_grad():
        return fixed_point(cell, x, steps=steps, algorithm="rbp").state


def step_fn(cell: HGRUCell, x: Tensor) -> Callable[[], Tensor]:
    """One no-grad step F(x, h) at the settled state."""
    h = settled_state(cell, x)

    def run() -> Tensor:
        with torch.no_grad():
            return cell(x, h)

    return run


class _ReplayConv:
    """A conv engine that hands back precomputed outputs in call order (no arithmetic)."""

    name = "replay"

    def __init__(self, outputs: list[Tensor]):
        self._outputs = outputs
        self._calls = 0

    def conv(self, x: Tensor, weight: Tensor) -> Tensor:
        out = self._outputs[self._calls % len(self._outputs)]
        self._calls += 1
        return out

    def conv_transpose(self, y: Tensor, weight: Tensor) -> Tensor:
        raise NotImplementedError("the replay engine only serves forward steps")


class _RecordingConv:
    """Wraps an engine and keeps every output, to replay them later."""

    name = "recording"

    def __init__(self, engine):
        self._engine = engine
        self.outputs: list[Tensor] = []

    def conv(self, x: Tensor, weight: Tensor) -> Tensor:
        self.outputs.append(self._engine.conv(x, weight))
        return self.outputs[-1]

    def conv_transpose(self, y: Tensor, weight: Tensor) -> Tensor:
        return self._engine.conv_transpose(y, weight)


def elementwise_fn(cell: HGRUCell, x: Tensor) -> Callable[[], Tensor]:
    """The cell's no-grad step with both k x k conv outputs precomputed: its elementwise passes alone."""
    h = settled_state(cell, x)
    backend = resolve_backend(cell.backend, x.device)
    recorder = _RecordingConv(conv_engines.resolve_conv(cell.conv, x, cell.kernel_size))
    with torch.no_grad():
        backend.step(cell.params(), x, h, recorder)
    replay = _ReplayConv(recorder.outputs)

    def run() -> Tensor:
        with torch.no_grad():
            return backend.step(cell.params(), x, h, replay)

    return run


def vjp_fn(cell: HGRUCell, x: Tensor, seed: int = 1) -> Callable[[], Tensor]:
    """One J^T v at the settled state, ``cell.linearize`` taken once (as in the adjoint loop)."""
    h = settled_state(cell, x)
    lin = cell.linearize(x, h)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x.device)

    def run() -> Tensor:
        with torch.no_grad():
            return lin.vjp(v)

    return run


def training_loss(
    cell: HGRUCell, x: Tensor, algorithm: str, steps: int, adjoint_steps: int, use_linearize: bool | None = None,
) -> tuple[Tensor, FixedPointStats]:
    """Forward of one training iteration: (loss, stats). ``adjoint_tol=0``: exactly ``adjoint_steps``;
    ``use_linearize=False``: the adjoint through autograd, as the published algorithm."""
    res = fixed_point(cell, x, steps=steps, algorithm=algorithm, adjoint_steps=adjoint_steps, adjoint_tol=0.0,
                      use_linearize=use_linearize)
    loss = res.state.square().mean()
    if res.penalty is not None:
        loss = loss + PENALTY_WEIGHT * res.penalty
    return loss, res.stats


def train_iteration_fn(
    cell: HGRUCell, x: Tensor, algorithm: str, steps: int, adjoint_steps: int, use_linearize: bool | None = None,
) -> Callable[[], FixedPointStats]:
    """One full training iteration (forward, loss, penalty, backward); returns the solve's stats."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm: expected one of {ALGORITHMS}, got {algorithm!r}")

    def run() -> FixedPointStats:
        cell.zero_grad(set_to_none=True)
        loss, stats = training_loss(cell, x, algorithm, steps, adjoint_steps, use_linearize)
        loss.backward()
        return stats

    return run


@dataclass
class Sweep:
    """What one ``crbp-fast bench`` run measures (the CLI builds it from its options)."""

    device: torch.device
    shape: Shape
    algorithms: tuple[str, ...]
    backends: tuple[str, ...]
    convs: tuple[str, ...]
    steps: tuple[int, ...]  # N of the memory suite
    speed_steps: tuple[int, ...]  # N of the speed suite's training iterations
    adjoint_steps: int
    repeats: int
    warmup: int
    rss: bool = True  # CPU: also the peak RSS of a fresh child per configuration
    rss_jobs: int = 1  # such children at a time (each process's peak is its own)
    compile: bool = False  # speed: also time torch.compile of the reference step
    compile_timeout: float = 600.0
    seed: int = 0
    _engines: list[tuple[str, str]] | None = field(default=None, repr=False)

    def available_engines(self) -> list[tuple[str, str]]:
        """The distinct (backend, conv) pairs that run here, in the order asked for.

        A pair that cannot be resolved or whose first step raises is skipped with a printed
        note (a backend or engine missing from this installation must not stop the sweep).
        """
        if self._engines is not None:
            return self._engines
        pairs: list[tuple[str, str]] = []
        for backend in self.backends:
            for conv in self.convs:
                try:
                    pair = resolve_engines(backend, conv, self.shape, self.device)
                    if pair in pairs:
                        continue
                    first_step(self.shape, *pair, self.device, self.seed)
                except Unavailable as err:
                    tqdm.write(f"note: skipping backend={backend} conv={conv}: {err}")
                    continue
                pairs.append(pair)
        self._engines = pairs
        return pairs


def first_step(shape: Shape, backend: str, conv: str, device: torch.device, seed: int = 0) -> None:
    """One no-grad step of the (resolved) pair; :class:`Unavailable` with the error if it raises."""
    try:
        cell = make_cell(shape, backend, conv, device, seed)
        x = make_inputs(shape, device, seed)
        with torch.no_grad():
            cell(x)
        synchronize(device)
    except Exception as err:
        message = f"{type(err).__name__}: {err}".splitlines()[0]
        raise Unavailable(f"its first step raised {message}") from None


def runnable_engines(backend: str, conv: str, shape: Shape, device: torch.device, seed: int = 0) -> tuple[str, str]:
    """The (backend, conv) names that run for the requested ones, checked by one step."""
    pair = resolve_engines(backend, conv, shape, device)
    first_step(shape, *pair, device, seed)
    return pair


def conv_fn(
    shape: Shape, conv: str, device: torch.device, transpose: bool = False, seed: int = 0,
) -> Callable[[], Tensor]:
    """One k x k 'same' correlation (or its transpose, as in the VJP) of the conv engine ``conv``,
    C -> C channels at ``shape``, with a fixed weight (engines may cache its spectrum)."""
    probe = torch.zeros(1, device=device).expand(*shape.tensor_shape)
    try:
        engine = conv_engines.resolve_conv(conv, probe, shape.kernel_size)
    except (RuntimeError, NotImplementedError, ImportError) as err:
        raise Unavailable(str(err)) from None
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape.tensor_shape, generator=gen).to(device)
    k = shape.kernel_size
    weight = (torch.randn(shape.channels, shape.channels, k, k, generator=gen) / (k * shape.channels**0.5)).to(device)
    op = engine.conv_transpose if transpose else engine.conv

    def run() -> Tensor:
        with torch.no_grad():
            return op(x, weight)

    try:
        run()
    except Exception as err:
        message = f"{type(err).__name__}: {err}".splitlines()[0]
        raise Unavailable(f"conv {engine.name!r}: its first call raised {message}") from None
    return run


__all__ = [
    "PAPER_SHAPE", "PENALTY_WEIGHT", "PRESETS", "Preset", "QUICK_SHAPE", "SETTLE_STEPS", "SWEEP_BACKENDS",
    "SWEEP_CONVS", "Shape", "Sweep", "Unavailable", "conv_fn", "first_step", "is_out_of_memory", "make_cell",
    "elementwise_fn", "make_inputs", "resolve_device", "resolve_engines", "runnable_engines", "settled_state", "step_fn",
    "synchronize", "train_iteration_fn", "training_loss", "vjp_fn",
]
