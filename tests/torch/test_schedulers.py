"""torch.optim.lr_scheduler with every PyTorch optimizer: schedulers that cycle momentum through ``betas``
(OneCycleLR's default), and Tensor learning rates, which schedulers fill in place."""

import pytest
import torch
from torch import nn

from stac_stam.torch import STAC, STAM, STAMLite

# name -> factory(model, lr, beta1=None): beta1 the trunk's momentum and the cap's beta1, or STAM's b1_base
OPTIMIZERS = {
    "stac": lambda model, lr, beta1=None: STAC(model, lr=lr, sign_lr=lr, **(
        {} if beta1 is None else dict(sign_momentum=beta1, betas=(beta1, 0.999)))),
    "stac_snr": lambda model, lr, beta1=None: STAC(model, lr=lr, sign_lr=lr, sign_step_scale="snr", **(
        {} if beta1 is None else dict(sign_momentum=beta1, betas=(beta1, 0.999)))),
    "stam": lambda model, lr, beta1=None: STAM(model.parameters(), lr=lr, **(
        {} if beta1 is None else dict(b1_base=beta1))),
    "stam_lite": lambda model, lr, beta1=None: STAMLite(model.parameters(), lr=lr, beta1_update_interval=1, **(
        {} if beta1 is None else dict(b1_base=beta1))),
}
NAMES = list(OPTIMIZERS)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def step(model, optimizer, seed):
    optimizer.zero_grad()
    model(torch.randn(8, 3, generator=torch.Generator().manual_seed(seed))).pow(2).mean().backward()
    optimizer.step()


@pytest.mark.parametrize("name", NAMES)
def test_one_cycle_lr_cycles_beta1_and_the_step_reads_it(name):
    model, twin = mlp(), mlp()
    optimizer = OPTIMIZERS[name](model, 1e-2)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=10)  # cycle_momentum=True
    # At the start of the cycle: lr = max_lr / 25 and beta1 = max_momentum (0.95), in every group.
    assert all(group["betas"][0] == 0.95 for group in optimizer.param_groups)
    reference = OPTIMIZERS[name](twin, 1e-2 / 25, beta1=0.95)
    step(model, optimizer, 0)
    step(twin, reference, 0)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    for seed in range(1, 6):
        scheduler.step()
        step(model, optimizer, seed)
    assert all(0.85 <= group["betas"][0] < 0.95 for group in optimizer.param_groups)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_a_tensor_learning_rate_under_a_scheduler_steps_as_the_same_float(name):
    model, twin = mlp(), mlp()
    # float64: the tensor holds the very numbers the scheduler computes for the float learning rate
    optimizer = OPTIMIZERS[name](model, torch.tensor(1e-2, dtype=torch.float64))
    reference = OPTIMIZERS[name](twin, 1e-2)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5 ** epoch) for opt in (optimizer, reference)]
    lr_tensors = [group["lr"] for group in optimizer.param_groups]
    for seed in range(3):
        for net, opt, scheduler in ((model, optimizer, schedulers[0]), (twin, reference, schedulers[1])):
            step(net, opt, seed)
            scheduler.step()
    assert all(group["lr"] is lr for group, lr in zip(optimizer.param_groups, lr_tensors))  # filled in place
    assert [float(group["lr"]) for group in optimizer.param_groups] == [group["lr"] for group in reference.param_groups]
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
