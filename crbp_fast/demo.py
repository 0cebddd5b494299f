"""A short demo: train a small hGRU a few iterations with each algorithm and show what each costs.

    python -m crbp_fast.demo            # or: crbp-fast demo

For each of bptt, cbptt, rbp and crbp: Adam on a toy denoising task (a 1x1 readout of h_N
recovers a clean pattern from the noisy drive), printing the loss, the LCP penalty, the adjoint iterations and the bytes saved
for backward (counted with saved-tensor hooks), which grow with N for BPTT and stay flat for RBP.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from . import ALGORITHMS, HGRUCell, fixed_point


def saved_bytes_during(fn) -> tuple[object, int]:
    """Run fn() and count the bytes of the distinct storages autograd saves for backward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def _check(args: argparse.Namespace) -> torch.device:
    """The demo's options, checked up front; ``CLIError`` naming the first one out of range."""
    import math

    from .cli import CLIError

    for option, value, low in (("--iterations", args.iterations, 1), ("--batch", args.batch, 1),
                               ("--channels", args.channels, 1), ("--size", args.size, 1),
                               ("--adjoint-steps", args.adjoint_steps, 0)):
        if value < low:
            raise CLIError(f"{option}: expected an int >= {low}, got {value}")
    if any(n < 1 for n in args.steps):
        raise CLIError(f"--steps: expected values of N >= 1, got {' '.join(map(str, args.steps))}")
    for option, value in (("--lr", args.lr), ("--lcp-weight", args.lcp_weight)):
        if not (math.isfinite(value) and value >= 0) or (option == "--lr" and value == 0):
            raise CLIError(f"{option}: expected a finite number {'> 0' if option == '--lr' else '>= 0'}, got {value}")
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        cell = HGRUCell(args.channels, args.kernel_size, backend=args.backend, conv=args.conv, device=device)
        from .hgru.backends import resolve_backend

        resolve_backend(cell.backend, device)
    except (ValueError, TypeError, RuntimeError) as err:
        raise CLIError(str(err)) from None
    return device


def run(args: argparse.Namespace) -> int:
    device = _check(args)
    torch.manual_seed(args.seed)
    b, c, s, k = args.batch, args.channels, args.size, args.kernel_size
    clean = (torch.rand(b, c, s, s, device=device) > 0.8).float()
    drive = clean + 0.5 * torch.randn_like(clean)
    print(f"device {device}; toy task: B={b}, C={c}, {s}x{s}, k={k}; {args.iterations} Adam iterations per algorithm")
    print(f"{'algorithm':<8} {'N':>4} {'loss first':>11} {'loss last':>10} {'penalty':>9} {'adjoint it':>10} {'saved for bw':>13} {'s/iter':>8}")
    for algorithm in args.algorithms:
        for steps in args.steps:
            torch.manual_seed(args.seed)
            cell = HGRUCell(c, k, backend=args.backend, conv=args.conv).to(device)
            readout = torch.nn.Conv2d(c, c, 1).to(device)
            opt = torch.optim.Adam([*cell.parameters(), *readout.parameters()], lr=args.lr)
            losses = []
            t0 = time.perf_counter()
            for _ in range(args.iterations):
                def forward():
                    res = fixed_point(cell, drive, steps=steps, algorithm=algorithm, adjoint_steps=args.adjoint_steps)
                    task = F.mse_loss(readout(res.state), clean)
                    pen = res.penalty if res.penalty is not None else torch.zeros((), device=device)
                    return res, task, pen

                (res, task, pen), nbytes = saved_bytes_during(forward)
                opt.zero_grad()
                (task + args.lcp_weight * pen).backward()
                opt.step()
                losses.append(float(task.detach()))
            per_iter = (time.perf_counter() - t0) / args.iterations
            adj = res.stats.adjoint_iterations
            print(
                f"{algorithm:<8} {steps:>4} {losses[0]:>11.4f} {losses[-1]:>10.4f} {float(pen.detach()):>9.2e} "
                f"{('-' if adj is None else adj):>10} {nbytes / 2**20:>10.2f} MiB {per_iter:>8.3f}"
            )
    print("saved-for-backward bytes grow with N for bptt/cbptt and stay flat for rbp/crbp.")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    p.add_argument("--steps", nargs="+", type=int, default=[5, 20], help="values of N")
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--kernel-size", type=int, default=5)
    p.add_argument("--adjoint-steps", type=int, default=15)
    p.add_argument("--lcp-weight", type=float, default=10.0)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--backend", default="auto")
    p.add_argument("--conv", default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)


def register(subparsers, name: str, help_text: str) -> None:
    p = subparsers.add_parser(name, help=help_text, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m crbp_fast.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    from .cli import CLIError

    try:
        return run(p.parse_args(argv))
    except CLIError as err:
        print(f"python -m crbp_fast.demo: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
