"""The kernel layer (``_kernels.py``) around the kernels: batching by device and dtype, the read's means, the
step's decision."""

import torch

from stac_stam.torch import STAM, stam, stam_lite
from stac_stam.torch._kernels import GroupTensors, all_finite, read_finite, read_sums


def test_a_group_of_several_dtypes_runs_one_torch_batch_per_dtype_as_op_by_op_does(monkeypatch):
    calls = []
    update = stam._stam_step

    def counting(params, *args, **kwargs):
        calls.append((len(params), params[0].dtype))
        return update(params, *args, **kwargs)

    monkeypatch.setattr(stam, "_stam_step", counting)
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(5, dtype=dtype)) for dtype in (torch.float32, torch.float64) * 2]
        optimizer = STAM(params, lr=1e-2, fused=fused)
        for _ in range(3):
            for param in params:
                param.grad = torch.randn_like(param)
            optimizer.step()
        results.append([param.detach().clone() for param in params])
    fused_calls, per_tensor_calls = calls[:6], calls[6:]
    assert fused_calls == [(2, torch.float32), (2, torch.float64)] * 3  # not the C kernels: float64 is there
    assert per_tensor_calls == [(1, torch.float32), (1, torch.float64)] * 6
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_the_means_of_a_zero_size_tensor_are_zero_and_its_read_is_finite():
    for fused in (True, False):
        group = GroupTensors(fused, dict(grads=[torch.zeros(0), torch.full((4,), 2.0), torch.zeros(3, 0)]))
        read = read_sums(group, "stam_lite_moments", ["grads"], stam_lite._stam_lite_sums)
        means = read.means()
        assert means[0].tolist() == [0.0, 2.0, 0.0] and means[1].tolist() == [0.0, 4.0, 0.0]
        assert all_finite([read, read_finite(group)])


def test_one_nonfinite_read_decides_the_whole_step():
    finite = GroupTensors(True, dict(grads=[torch.ones(3)]))
    bad = GroupTensors(False, dict(grads=[torch.tensor([1.0, float("nan")], dtype=torch.float64)]))
    assert all_finite([read_finite(finite)])
    assert not all_finite([read_finite(finite), read_finite(bad)])
