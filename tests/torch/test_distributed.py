"""Two real processes (torch.multiprocessing, gloo on 127.0.0.1, OMP_NUM_THREADS=1): under FSDP2 and DDP every
optimizer gives the numbers one process gives on the full batch, and a NaN in one process's shard skips the
step in both. One spawn runs every check, to keep the suite fast."""

import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from stac_stam.torch import STAC, STAM, STAMLite

OPTIMIZERS = {
    "STAC": lambda model: STAC(model, lr=1e-2),
    "STAC.recommended": lambda model: STAC.recommended(model, lr=1e-2),
    "STAM": lambda model: STAM(model.parameters(), lr=1e-2),
    "STAMLite": lambda model: STAMLite(model.parameters(), lr=1e-2),
}
STEPS = 3
WORLD = 2


def make_model():
    torch.manual_seed(0)
    # Odd sizes: FSDP2 shards dim 0 unevenly (the 9 rows of a weight as 5 and 4, the 3 of a bias as 2 and 1).
    model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 3))
    return model


def batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, generator=generator), torch.randn(8, 3, generator=generator)


def loss_of(model, inputs, targets):
    return (model(inputs) - targets).pow(2).mean()


def train_one_process(name):
    model = make_model()
    optimizer = OPTIMIZERS[name](model)
    inputs, targets = batch()
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss_of(model, inputs, targets).backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def local_batch(rank):
    inputs, targets = batch()
    half = inputs.shape[0] // WORLD
    return inputs[rank * half:(rank + 1) * half], targets[rank * half:(rank + 1) * half]


def check_fsdp2(rank, name):
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    optimizer = OPTIMIZERS[name](model)
    inputs, targets = local_batch(rank)
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss_of(model, inputs, targets).backward()  # FSDP2 averages the gradients over the processes
        optimizer.step()
    full = [p.full_tensor() for p in model.parameters()]
    for ours, theirs in zip(full, train_one_process(name)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=f"FSDP2 {name}")
    # A NaN in rank 1's shard only: both processes skip the step, each counts it once, nothing changes.
    optimizer.zero_grad()
    loss_of(model, inputs, targets).backward()
    if rank == 1:
        next(model.parameters()).grad.to_local().view(-1)[0] = float("nan")
    before = [p.to_local().clone() for p in model.parameters()]
    optimizer.step()
    assert optimizer.nonfinite_skipped_steps == 1, (name, rank)
    assert all(torch.equal(p.to_local(), b) for p, b in zip(model.parameters(), before)), (name, rank)


def check_ddp(rank, name):
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(make_model())
    optimizer = OPTIMIZERS[name](model.module)
    inputs, targets = local_batch(rank)
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss_of(model, inputs, targets).backward()
        optimizer.step()
    for ours, theirs in zip(model.parameters(), train_one_process(name)):
        torch.testing.assert_close(ours.detach(), theirs, rtol=1e-5, atol=1e-6, msg=f"DDP {name}")


def worker(rank, port, errors):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        for name in OPTIMIZERS:
            for check in (check_fsdp2, check_ddp):
                try:
                    check(rank, name)
                except Exception:  # noqa: BLE001 -- every failure is reported, the other checks still run
                    errors.put(f"rank {rank}, {check.__name__}, {name}:\n{traceback.format_exc()}")
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_fsdp2_and_ddp_give_the_numbers_of_one_process_and_skip_a_nan_on_one_rank_on_both(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    context = mp.get_context("spawn")
    errors = context.SimpleQueue()
    mp.start_processes(worker, args=(free_port(), errors), nprocs=WORLD, join=True, start_method="spawn")
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    assert not failures, "\n".join(failures)
