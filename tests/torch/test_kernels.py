"""TensorKernel's batched form: many small tensors in one call must give each tensor's own numbers, every time."""

import torch

from stac_stam.torch._kernels import TensorKernel


def _mean_square(grad, *, scale, mean):
    return scale * mean(grad.square())


def test_a_batch_of_small_tensors_gives_each_tensor_its_own_mean_and_the_same_bits_every_call():
    kernel = TensorKernel(_mean_square)
    torch.manual_seed(0)
    grads = [torch.randn(n) for n in (60_000, 50_000, 40_000, 30_000, 1, 7)]
    scale = torch.tensor([2.0])
    operands, scalars = [(g,) for g in grads], [{"scale": scale}] * len(grads)
    first = kernel.map(True, operands, scalars)
    for g, number in zip(grads, first):
        torch.testing.assert_close(number, 2.0 * g.double().square().mean().float())
    # The same call gives the same bits: the segment sums must not depend on how threads interleave.
    for _ in range(20):
        assert all(torch.equal(a, b) for a, b in zip(first, kernel.map(True, operands, scalars)))
