"""The library's one non-finite-gradient check for PyTorch (used by STAC and by STAM/STAMLite)."""

import torch


def all_finite(tensors):
    """True when no tensor holds a NaN or an Inf.

    One fused max-abs reduction per device and one host sync per device for the
    whole step, instead of a ``isfinite().all().item()`` per tensor. The tensors
    are only read.
    """
    by_device = {}
    for tensor in tensors:
        if tensor.numel():  # an empty tensor has no infinity norm
            by_device.setdefault(tensor.device, []).append(tensor)
    for same_device in by_device.values():
        max_abs = torch._foreach_norm(same_device, float("inf"))
        if not bool(torch.stack([m.float() for m in max_abs]).isfinite().all()):
            return False
    return True
