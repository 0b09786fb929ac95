"""STAM for PyTorch: AdamW with a variance-adaptive beta1 (seed 002), the same numbers as the JAX STAM."""

import math

import torch

from stac_stam.torch._base import SkipNonfiniteOptimizer, check_pair, check_range, require_keys
from stac_stam.torch._cpu_kernels import statistics_table
from stac_stam.torch._kernels import (GroupTensors, TensorStatistics, largest_finite, one_minus_power, read_sums,
                                      saturate_, sqrt_, traced_number, update, wide_dtype, widened, write_back)

# sigma^2 is capped at VARIANCE_CAP * tau^2 (the seed's "variance explosion" guard); as in the JAX STAM.
VARIANCE_CAP = 10.0

# The 0-d state entries, in the order stam_rule returns their new values.
_TENSOR_STATISTICS = ("variance", "scale", "beta1", "beta1_product", "step")


def _stam_sums(grad, mu):
    # Over one tensor, r = g - mu in float64 (finite whenever g and mu are): sum(r^2), sum(|r|), as the C kernel
    # stam_moments sums them.
    wide = wide_dtype(grad.device)
    residual = grad.to(wide) - mu.to(wide)
    return torch.stack([residual.square().sum(), residual.abs().sum()])


def stam_rule(residual_sq_mean, residual_abs_mean, *, variance, scale, beta1_product, step, lr, b1_base, b2,
              adapt_strength, tau_decay, eps, largest):
    """STAM's per-tensor numbers (float64 vectors, one value per tensor) from this step's mean(r^2) and
    mean(|r|): the new state entries and the update's coefficients ``beta1``, ``lr / (1 - prod beta1)`` and
    ``1 - b2^t``. A new variance or scale that overflows the state's dtype (largest value ``largest``) counts as
    non-finite: both keep their old values and beta1 is b1_base."""
    new_variance = b2 * variance + (1 - b2) * residual_sq_mean
    new_scale = tau_decay * scale + (1 - tau_decay) * residual_abs_mean
    finite = torch.maximum(new_variance, new_scale) <= largest  # False for NaN too
    scale_sq = new_scale.square()
    new_variance = torch.minimum(new_variance, VARIANCE_CAP * scale_sq)
    z = new_variance / (scale_sq + eps)
    adapted = torch.clamp(b1_base * (1 - adapt_strength * z / (1 + z)), b1_base * (1 - adapt_strength), b1_base)
    new_beta1 = torch.where(finite, adapted, b1_base)
    new_step, new_beta1_product = step + 1, beta1_product * new_beta1
    return (torch.where(finite, new_variance, variance), torch.where(finite, new_scale, scale), new_beta1,
            new_beta1_product, new_step, lr / (1 - new_beta1_product),
            one_minus_power(b2, new_step))


def _stam_step(params, grads, mus, nus, *, beta1, step_size, bias_correction2, decay, b2, one_minus_b2, eps, bound):
    """The update over lists (``torch._foreach_*``); the C kernel ``stam_step`` does the same float32
    operations. ``beta1``, ``step_size``, ``bias_correction2``: one 0-d tensor per tensor."""
    dtype = mus[0].dtype
    p, g = widened(params, dtype), widened(grads, dtype)
    torch._foreach_mul_(mus, beta1)
    torch._foreach_add_(mus, torch._foreach_mul(g, torch._foreach_add(torch._foreach_neg(beta1), 1)))
    saturate_(mus, bound)
    torch._foreach_mul_(nus, b2)
    torch._foreach_add_(nus, torch._foreach_mul(torch._foreach_mul(g, one_minus_b2), g))
    denominator = torch._foreach_div(nus, bias_correction2)
    sqrt_(denominator)
    torch._foreach_add_(denominator, eps)
    step = torch._foreach_mul(mus, step_size)
    torch._foreach_div_(step, denominator)
    torch._foreach_mul_(p, decay)
    torch._foreach_sub_(p, step)
    write_back(params, p)


def stam_update(tensors, read, statistics, *, lr, b1_base, b2, weight_decay, adapt_strength, tau_decay, eps):
    r"""STAM's step (seed 002, "Core Update Rules") over a parameter group (``tensors``, a ``GroupTensors``), in
    place.

    Per tensor, at step t, with gradient g::

        r      = g - mu_{t-1}
        var_t  = b2 var_{t-1} + (1 - b2) mean(r^2)          capped at 10 tau_t^2
        tau_t  = tau_decay tau_{t-1} + (1 - tau_decay) mean(|r|)
        z      = var_t / (tau_t^2 + eps)
        beta1  = clip(b1_base (1 - adapt_strength z / (1 + z)), b1_base (1 - adapt_strength), b1_base)
        mu_t   = beta1 mu_{t-1} + (1 - beta1) g;     nu_t = b2 nu_{t-1} + (1 - b2) g^2
        p     <- p (1 - lr weight_decay) - lr [mu_t / (1 - prod beta1)] / (sqrt(nu_t / (1 - b2^t)) + eps)

    Non-finite var_t or tau_t (or too large for the state's dtype): beta1 =
    b1_base and both keep their old values. The two means come from ``read``
    (one read of g and mu, over the whole tensor under FSDP2) and the
    per-tensor numbers are computed in float64 (``stam_rule``), then stored
    into ``statistics`` (the 0-d state entries); then each tensor is one pass
    updating mu, nu and p. mu stays within float32's range; nu may overflow
    to Inf, as AdamW's does, and then that coordinate's step is 0. Parameters
    of a 16-bit dtype are computed in float32 and stored back.
    """
    device = read.sums.device
    values = statistics.values(device)
    del values["beta1"]  # the last step's, kept for logging
    new = stam_rule(*read.means(), **values, lr=lr, b1_base=b1_base, b2=b2,
                    adapt_strength=adapt_strength, tau_decay=tau_decay, eps=eps, largest=statistics.largest(device))
    statistics.store(dict(zip(_TENSOR_STATISTICS, new)))
    _, _, beta1, _, _, step_size, bias_correction2 = new
    update(tensors, "stam_step", _stam_step, ["params", "grads", "mus", "nus"],
           vectors=dict(beta1=beta1, step_size=step_size, bias_correction2=bias_correction2),
           numbers=dict(decay=1 - lr * weight_decay, b2=b2, one_minus_b2=1 - b2, eps=eps,
                        bound=largest_finite(tensors.lists["mus"][0].dtype)))


class STAM(SkipNonfiniteOptimizer):
    r"""STAM: AdamW whose beta1 adapts to each tensor's gradient variance (seed 002).

    High residual variance lowers beta1 (less momentum), low variance keeps it
    at ``b1_base``; ``adapt_strength=0`` is exactly AdamW. See ``stam_update``
    for the math. Arguments and defaults are the JAX STAM's, with torch's ``lr``
    for ``learning_rate``:

    ===============  ==========  ========  =====================================
    argument         default     range     meaning
    ===============  ==========  ========  =====================================
    lr               1e-3        >= 0      step size
    b1_base          0.9         (0, 1)    base first-moment decay
    b2               0.999       (0, 1)    second-moment and variance decay
    weight_decay     0.01        >= 0      decoupled weight decay
    adapt_strength   0.2         [0, 0.5]  how far beta1 may drop below b1_base
    tau_decay        0.99        (0, 1)    decay of the running scale tau
    eps              1e-8        > 0       denominator guard
    ===============  ==========  ========  =====================================

    Each param group holds ``betas = (b1_base, b2)``, torch's name, so a
    scheduler that cycles momentum (``OneCycleLR``, ``CyclicLR``) moves
    ``b1_base``; ``lr`` may be a 0-d tensor, as in torch.optim. A group given
    to ``add_param_group`` may set ``b1_base`` or ``b2`` by name.

    State per parameter (JAX name in brackets): ``step`` [count], ``exp_avg``
    [mu], ``exp_avg_sq`` [nu], ``variance``, ``scale``, ``beta1`` (the beta1
    used at the last step, for logging), ``beta1_product``. A step with a
    NaN/Inf gradient changes nothing and is counted in
    ``nonfinite_skipped_steps`` (``error_if_nonfinite=True`` raises instead).

    Example::

        optimizer = STAM(model.parameters(), lr=1e-3)
        loss_fn(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    """

    BETA_NAMES = ("b1_base", "b2")

    def __init__(self, params, lr=1e-3, b1_base=0.9, b2=0.999, weight_decay=0.01, adapt_strength=0.2,
                 tau_decay=0.99, eps=1e-8, error_if_nonfinite=False, fused=True):
        defaults = dict(lr=lr, betas=(b1_base, b2), weight_decay=weight_decay, adapt_strength=adapt_strength,
                        tau_decay=tau_decay, eps=eps)
        self._check_group(defaults)
        super().__init__(params, defaults, error_if_nonfinite, fused)

    def _check_group(self, group, where=""):
        require_keys(group, ("lr", "betas", "weight_decay", "adapt_strength", "tau_decay", "eps"), where, "STAM")
        check_range(f"{where}lr", group["lr"], 0.0, tensor=True)
        b1_base, b2 = check_pair(f"{where}betas", group["betas"])
        check_range(f"{where}b1_base", b1_base, 0.0, 1.0, low_open=True)
        check_range(f"{where}b2", b2, 0.0, 1.0, low_open=True)
        check_range(f"{where}weight_decay", group["weight_decay"], 0.0)
        check_range(f"{where}adapt_strength", group["adapt_strength"], 0.0, 0.5, high_open=False)
        check_range(f"{where}tau_decay", group["tau_decay"], 0.0, 1.0, low_open=True)
        check_range(f"{where}eps", group["eps"], 0.0, low_open=True)

    def _initial_state(self, group, param):
        stat_dtype = torch.promote_types(param.dtype, torch.float32)
        scalar = lambda value: torch.full((), value, dtype=stat_dtype, device=param.device)  # noqa: E731
        return dict(step=scalar(0.0), exp_avg=torch.zeros_like(param, dtype=stat_dtype),
                    exp_avg_sq=torch.zeros_like(param, dtype=stat_dtype), variance=scalar(0.0), scale=scalar(0.0),
                    beta1=scalar(group["betas"][0]), beta1_product=scalar(1.0))

    def _prepare_group(self, group, params, grads):
        states, created = self._states(group, params)
        tensors = GroupTensors(self.fused, dict(params=params, grads=grads,
                                                mus=[state["exp_avg"] for state in states],
                                                nus=[state["exp_avg_sq"] for state in states]))
        statistics = TensorStatistics(tensors, states, _TENSOR_STATISTICS,
                                      statistics_table(self, group, _TENSOR_STATISTICS))
        return read_sums(tensors, "stam_moments", ["grads", "mus"], _stam_sums), (states, created, tensors, statistics)

    def _update_group(self, group, params, grads, read, context):
        states, created, tensors, statistics = context
        self._store_states(created)
        stam_update(tensors, read, statistics, lr=group["lr"], b1_base=traced_number(group["betas"][0]),
                    b2=group["betas"][1],
                    weight_decay=group["weight_decay"], adapt_strength=group["adapt_strength"],
                    tau_decay=group["tau_decay"], eps=group["eps"])
