"""Two real processes (torch.multiprocessing, gloo on 127.0.0.1, OMP_NUM_THREADS=1): under FSDP2 and DDP every
optimizer gives the numbers one process gives on the full batch, and a NaN in one process's shard skips the
step in both; a sharded STAC.compact resumes from torch.distributed.checkpoint bit for bit. One spawn runs
every check, to keep the suite fast."""

import os
import pathlib
import time
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
    "STAC.compact": lambda model: STAC.compact(model, lr=1e-2),  # factored trunk, int8 momentum
    "STAC factored, bf16 momentum": lambda model: STAC(model, lr=1e-2, sign_step_scale="factored",
                                                       sign_state_dtype=torch.bfloat16),
    "STAC factored, no momentum": lambda model: STAC(model, lr=1e-2, sign_step_scale="factored", sign_momentum=0.0),
    "STAM": lambda model: STAM(model.parameters(), lr=1e-2),
    "STAMLite": lambda model: STAMLite(model.parameters(), lr=1e-2),
}
STEPS = 3
WORLD = 2


def make_model():
    torch.manual_seed(0)
    # Odd sizes: FSDP2 shards dim 0 unevenly (the 9 rows of a weight as 5 and 4, the 3 of a bias as 2 and 1), and
    # the one row of the second layer's weight and bias as 1 and none.
    model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 1), nn.Tanh(), nn.Linear(1, 7), nn.Tanh(),
                          nn.Linear(7, 3))
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
    model = sharded_model()
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


def sharded_model():
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def check_fsdp2_resume(rank, checkpoint_dir):
    # STAC.compact's row statistics and int8 row scales are DTensors sharded as their parameters' rows (uneven,
    # one shard empty), its column statistics replicated: a checkpoint saved after two steps and loaded into a
    # fresh optimizer gives the third step bit for bit.
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    inputs, targets = local_batch(rank)
    models, optimizers = [], []
    for _ in range(2):
        models.append(sharded_model())
        optimizers.append(OPTIMIZERS["STAC.compact"](models[-1]))
    (model, twin), (optimizer, resumed) = models, optimizers
    for _ in range(2):
        optimizer.zero_grad()
        loss_of(model, inputs, targets).backward()
        optimizer.step()
    dcp.save({"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)},
             checkpoint_id=checkpoint_dir)
    loaded = {"model": get_model_state_dict(twin), "optimizer": get_optimizer_state_dict(twin, resumed)}
    dcp.load(loaded, checkpoint_id=checkpoint_dir)
    set_model_state_dict(twin, loaded["model"])
    set_optimizer_state_dict(twin, resumed, loaded["optimizer"])
    state = resumed.state[twin[2].weight]
    assert [type(state[key]).__name__ for key in ("exp_avg_sq_row", "momentum_scale", "momentum_buffer")] == \
        ["DTensor"] * 3
    assert state["exp_avg_sq_row"].to_local().numel() == (1 if rank == 0 else 0)
    for each_model, each_optimizer in zip(models, optimizers):
        each_optimizer.zero_grad()
        loss_of(each_model, inputs, targets).backward()
        each_optimizer.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.to_local(), q.to_local()), rank
        for key, value in optimizer.state[p].items():
            other = resumed.state[q][key]
            assert torch.equal(*(v.to_local() if hasattr(v, "to_local") else v for v in (value, other))), (key, rank)


def check_factored_refuses_a_trunk_sharded_over_another_dim(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    model = make_model()
    mesh = init_device_mesh("cpu", (WORLD,))
    model[0].weight = nn.Parameter(distribute_tensor(model[0].weight.detach(), mesh, [Shard(1)]))
    try:
        STAC.compact(model)
    except ValueError as error:
        assert "a sharded trunk parameter must be sharded over dim 0 only (Shard(0), as fully_shard does) or " \
               "replicated; '0.weight' has placements (Shard(dim=1),)" in str(error), error
    else:
        raise AssertionError("STAC.compact took a trunk weight sharded over dim 1")


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


def rendezvous(rank, folder):
    """The gloo group over a TCP store on 127.0.0.1: rank 0 binds the store to a port the system picks and writes
    it to ``folder`` for the others (a port probed free beforehand can be taken before the store binds it)."""
    port_file = pathlib.Path(folder) / "port"
    if rank == 0:
        store = dist.TCPStore("127.0.0.1", 0, WORLD, is_master=True, wait_for_workers=False)
        port_file.with_suffix(".tmp").write_text(str(store.port))
        port_file.with_suffix(".tmp").rename(port_file)
    else:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert time.monotonic() < deadline, "rank 0 did not publish its store's port"
            time.sleep(0.01)
        store = dist.TCPStore("127.0.0.1", int(port_file.read_text()), WORLD, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD)


def worker(rank, folder, errors):
    torch.set_num_threads(1)
    rendezvous(rank, folder)
    checkpoint_dir = os.path.join(folder, "checkpoint")
    try:
        for name in OPTIMIZERS:
            for check in (check_fsdp2, check_ddp):
                try:
                    check(rank, name)
                except Exception:  # noqa: BLE001 -- every failure is reported, the other checks still run
                    errors.put(f"rank {rank}, {check.__name__}, {name}:\n{traceback.format_exc()}")
        for check, args in ((check_fsdp2_resume, (checkpoint_dir,)),
                            (check_factored_refuses_a_trunk_sharded_over_another_dim, ())):
            try:
                check(rank, *args)
            except Exception:  # noqa: BLE001
                errors.put(f"rank {rank}, {check.__name__}:\n{traceback.format_exc()}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_fsdp2_and_ddp_give_the_numbers_of_one_process_and_skip_a_nan_on_one_rank_on_both(monkeypatch, tmp_path):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    context = mp.get_context("spawn")
    errors = context.SimpleQueue()
    mp.start_processes(worker, args=(str(tmp_path), errors), nprocs=WORLD, join=True, start_method="spawn")
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    assert not failures, "\n".join(failures)
