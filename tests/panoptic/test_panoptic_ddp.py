"""Two-process DDP of the panoptic trainer (gloo on CPU): what DDP promises, checked exactly.

A 2-process run with ``batch_size`` b cannot equal a 1-process run with batch 2b for this model,
and the test does not claim it: Mask R-CNN normalises its losses by the number of sampled anchors,
proposals and positive ROIs of the whole batch (counts that differ per image), its samplers draw
from each process's own RNG stream, and the backbone's BatchNorm takes statistics over the
process's batch. What DDP does promise is that every rank steps with the mean of the ranks'
gradients, each rank's gradient being that of its own shard. So the reference here is one
process that, per step, runs each rank's shard (the images ``StepBatches`` gives that rank, from
that rank's RNG state, with rank 0's BatchNorm buffers, which DDP broadcasts), averages the
gradients and takes the Adam step. The DDP gradients, the logged global-mean losses, the final
parameters and buffers, and the held-out PQ (each rank evaluates half the images; torchmetrics
gathers the states) must match it, and rank 0 alone writes the folder.

The process group is joined through a ``file://`` rendezvous in the test's tmp folder: no TCP
port is chosen in advance, so no other job can take it between choosing and binding.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from crbp_fast.tasks.panoptic.data import CocoPanoptic, collate
from crbp_fast.tasks.panoptic.train import PanopticTrainConfig, build_model, evaluate_checkpoint, read_checkpoint, train
from crbp_fast.tasks.runs import StepBatches, rng_state, set_rng_state

WORLD = 2


def _config(root, out, batch_size: int) -> PanopticTrainConfig:
    return PanopticTrainConfig(
        data=str(root), fpn_width=16, semantic_width=16, steps=2, cell_backend="torch", batch_size=batch_size,
        iterations=2, eval_limit=2, eval_untrained=False, checkpoint_every=0, out=str(out), progress=False,
        threads=1, device="cpu")


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}


def _worker(rank: int, rendezvous: str, config: dict, grads: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank),
                       "GLOO_SOCKET_IFNAME": "lo"})
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=WORLD)
    try:
        saved = {}
        result = train(PanopticTrainConfig(**config), after_backward=lambda step, m: saved.update({step: _grads(m)}))
        assert dist.is_initialized()  # train() leaves a group it did not start
        torch.save({"grads": saved, "metrics": result.metrics, "losses": result.losses}, f"{grads}.rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _reference(config: PanopticTrainConfig, dataset: CocoPanoptic) -> tuple[torch.nn.Module, list, list]:
    """One process doing what the two ranks do: per step, each rank's shard from its own RNG
    state, the gradients averaged, one Adam step (module docstring)."""
    torch.set_num_threads(1)
    model = build_model(config, dataset.things, dataset.stuffs)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    states = [rng_state() for _ in range(WORLD)]  # every rank starts from the seeded state
    samplers = [StepBatches(0, config.iterations, config.batch_size, r, WORLD, len(dataset), config.seed)
                for r in range(WORLD)]
    params = dict(model.named_parameters())
    step_grads, losses = [], []
    for step in range(config.iterations):
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        rank0_buffers, total, loss_sum = None, {}, 0.0
        for r in range(WORLD):
            model.load_state_dict(buffers, strict=False)  # DDP broadcasts rank 0's buffers each forward
            set_rng_state(states[r])
            images, targets = collate([dataset[i] for i in samplers[r].global_batch(step)[r::WORLD]])
            out = model(images, targets)
            loss = sum(out.losses.values()) + config.lcp_weight * out.penalty
            model.zero_grad(set_to_none=True)
            loss.backward()
            states[r] = rng_state()
            loss_sum += float(loss.detach())
            for n, g in _grads(model).items():
                if g is not None:
                    total[n] = total[n] + g if n in total else g
            if r == 0:
                rank0_buffers = {n: b.clone() for n, b in model.named_buffers()}
        model.load_state_dict(rank0_buffers, strict=False)
        mean = {n: total[n] / WORLD if n in total else None for n in params}  # unused on every rank: no grad
        for n, p in params.items():
            p.grad = mean[n]
        step_grads.append(mean)
        losses.append(loss_sum / WORLD)
        optimizer.step()
    return model, step_grads, losses


def _close(got: torch.Tensor, want: torch.Tensor, name: str, rtol: float = 1e-5, atol: float = 1e-7) -> None:
    assert got.shape == want.shape, name
    err = (got.double() - want.double()).abs()
    assert bool((err <= atol + rtol * want.double().abs()).all()), f"{name}: max abs error {float(err.max()):.3e}"


@pytest.mark.slow
def test_two_processes_step_with_the_mean_of_their_shard_gradients(panoptic_root, tmp_path):
    out, grads = tmp_path / "ddp", str(tmp_path / "grads")
    config = _config(panoptic_root, out, 1)
    mp.spawn(_worker, args=(f"file://{tmp_path / 'rendezvous'}", asdict(config), grads), nprocs=WORLD, join=True)
    ranks = [torch.load(f"{grads}.rank{r}.pt", weights_only=False) for r in range(WORLD)]

    dataset = CocoPanoptic(panoptic_root, config.split)
    model, want_grads, want_losses = _reference(config, dataset)
    for rank, got in enumerate(ranks):
        assert sorted(got["grads"]) == [1, 2]
        for step in (1, 2):
            for name, want in want_grads[step - 1].items():
                g = got["grads"][step][name]
                assert (g is None) == (want is None), f"rank {rank} step {step} {name}: grad presence differs"
                if want is not None:
                    _close(g, want, f"rank {rank} step {step} grad {name}", atol=1e-8)
        assert got["losses"] == pytest.approx(want_losses, rel=1e-5)  # the all-reduced mean, on every rank

    # Rank 0 alone wrote: the lock, one config, one record per step, one checkpoint; its weights
    # are the reference's after two steps.
    assert sorted(os.listdir(out)) == [".lock", "checkpoint.pt", "config.json", "log.jsonl"]
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [(r["kind"], r["step"]) for r in records] == [("train", 1), ("train", 2), ("eval", 2)]
    assert [r["loss"] for r in records[:2]] == pytest.approx(want_losses, rel=1e-5)
    ckpt = read_checkpoint(out / "checkpoint.pt")
    want_state = model.state_dict()
    assert set(ckpt["model"]) == set(want_state)
    for name, value in ckpt["model"].items():
        if value.is_floating_point():
            _close(value, want_state[name], f"checkpoint {name}", atol=1e-6)
        else:
            assert torch.equal(value, want_state[name]), name

    # The held-out PQ of the 2-process evaluation (one image per rank, states gathered) is the
    # 1-process PQ of the same checkpoint on both images.
    alone = evaluate_checkpoint(out / "checkpoint.pt", limit=2, batch_size=2)
    for rank in range(WORLD):
        for key in ("pq", "sq", "rq"):
            assert ranks[rank]["metrics"][key] == pytest.approx(alone[key], abs=1e-6), (rank, key)
