"""STAMLite for PyTorch: STAM's adaptive beta1 from cheap tensor moments, RMS denominator (seed 002)."""

import math

import torch

from stac_stam.torch._base import SkipNonfiniteOptimizer, check_pair, check_range, require_keys, resolve_state_dtype
from stac_stam.torch._cpu_kernels import statistics_table
from stac_stam.torch._kernels import (GroupTensors, TensorStatistics, compute_dtype, largest_finite,
                                      one_minus_power, read_sums, saturate_, traced_number, update,
                                      wide_dtype, widened, write_back)

# The 0-d state entries, in the order stam_lite_rule returns their new values.
_TENSOR_STATISTICS = ("grad_mean", "grad_sq_mean", "beta1", "beta1_product", "step")


def _stam_lite_sums(grad):
    # Over one tensor, in float64: sum(g), sum(g^2), as the C kernel stam_lite_moments sums them.
    g = grad.to(wide_dtype(grad.device))
    return torch.stack([g.sum(), g.square().sum()])


def stam_lite_rule(g_means, *, grad_mean, grad_sq_mean, beta1, beta1_product, step, lr, b1_base,
                   adapt_strength, moment_decay, beta1_update_interval, eps, largest):
    """STAMLite's per-tensor numbers (float64 vectors, one value per tensor) from this step's mean(g) and
    mean(g^2) (``g_means``, a matrix of these two rows): the new state entries and the update's coefficient
    ``lr / ((1 - prod beta1) rms)``.

    Computed in float64, where no moment of float32 gradients overflows; stored saturated at the largest value
    of the state's dtype (``largest``). So a gradient whose square overflows float32 (1e20) moves the
    parameter by about lr, as AdamW's first step does, never by lr / eps; and E[g^2] never falls behind a
    momentum that grew with such gradients."""
    # The two moments as the rows of one matrix: each step below is one small op for both.
    new_step, moments = step + 1, torch.stack([grad_mean, grad_sq_mean])
    new_moments = moment_decay * moments + (1 - moment_decay) * g_means
    finite = new_moments.isfinite().all(0)
    new_mean, new_sq_mean = new_moments
    z = (new_sq_mean - new_mean.square()).clamp(min=0) / (new_sq_mean + eps)
    adapted = torch.clamp(b1_base * (1 - adapt_strength * z / (1 + z)), b1_base * (1 - adapt_strength), b1_base)
    refresh = torch.remainder(step, beta1_update_interval) == 0  # step = new_step - 1, an integer
    new_beta1 = torch.where(finite, torch.where(refresh, adapted, beta1), b1_base)
    new_beta1_product = beta1_product * new_beta1
    new_moments = torch.where(finite, new_moments, moments)
    rms = (new_moments[1] / one_minus_power(moment_decay, new_step)).sqrt() + eps
    new_mean, new_sq_mean = torch.clamp(new_moments, -largest, largest)  # E[g^2] >= 0: its clamp is max=largest
    return (new_mean, new_sq_mean, new_beta1, new_beta1_product, new_step, lr / ((1 - new_beta1_product) * rms))


def _stam_lite_step(params, grads, mus, *, beta1, step_size, decay, bound):
    """The update over lists (``torch._foreach_*``); the C kernel ``stam_lite_step`` does the same float32
    operations. ``beta1``, ``step_size``: one 0-d tensor per tensor."""
    dtype = compute_dtype(params[0])
    p, g, m = widened(params, dtype), widened(grads, dtype), widened(mus, dtype)
    torch._foreach_mul_(m, beta1)
    torch._foreach_add_(m, torch._foreach_mul(g, torch._foreach_add(torch._foreach_neg(beta1), 1)))
    saturate_(m, bound)
    step = torch._foreach_mul(m, step_size)  # from the float32 mu, before a 16-bit mu is rounded
    write_back(mus, m)
    torch._foreach_mul_(p, decay)
    torch._foreach_sub_(p, step)
    write_back(params, p)


def stam_lite_update(tensors, read, statistics, *, lr, b1_base, weight_decay, adapt_strength, moment_decay,
                     beta1_update_interval, eps):
    r"""STAMLite's step (seed 002, "STAMLite Approximation") over a parameter group (``tensors``, a
    ``GroupTensors``), in place.

    Per tensor, at step t, with gradient g and k = beta1_update_interval::

        E[g]_t   = moment_decay E[g]_{t-1}   + (1 - moment_decay) mean(g)
        E[g^2]_t = moment_decay E[g^2]_{t-1} + (1 - moment_decay) mean(g^2)
        z        = max(E[g^2]_t - E[g]_t^2, 0) / (E[g^2]_t + eps)
        beta1    = clip(b1_base (1 - adapt_strength z / (1 + z)), b1_base (1 - adapt_strength), b1_base)
                   recomputed on steps 1, 1 + k, 1 + 2k, ..., held in between
        mu_t     = beta1 mu_{t-1} + (1 - beta1) g                  (stored in state_dtype)
        p       <- p (1 - lr weight_decay) - lr [mu_t / (1 - prod beta1)] / (sqrt(E[g^2]_t / (1 - moment_decay^t))
                   + eps)

    Non-finite moments: beta1 = b1_base and the moments keep their old values;
    moments beyond the state's dtype are stored at its largest value (see
    ``stam_lite_rule``). The two
    means come from ``read`` (one read of g, over the whole tensor under
    FSDP2) and the per-tensor numbers are computed in float64, then stored
    into ``statistics`` (the 0-d state entries); then each tensor is one pass
    updating mu and p. mu stays within its dtype's finite range.
    """
    device = read.sums.device
    new = stam_lite_rule(read.means(), **statistics.values(device), lr=lr, b1_base=b1_base,
                         adapt_strength=adapt_strength, moment_decay=moment_decay,
                         beta1_update_interval=beta1_update_interval, eps=eps, largest=statistics.largest(device))
    statistics.store(dict(zip(_TENSOR_STATISTICS, new)))
    _, _, beta1, _, _, step_size = new
    update(tensors, "stam_lite_step", _stam_lite_step, ["params", "grads", "mus"],
           vectors=dict(beta1=beta1, step_size=step_size),
           numbers=dict(decay=1 - lr * weight_decay, bound=largest_finite(tensors.lists["mus"][0].dtype)))


class STAMLite(SkipNonfiniteOptimizer):
    r"""STAMLite: STAM's variance-adaptive beta1 at lower cost (seed 002).

    One moment per parameter (AdamW keeps two) and a tensor-level RMS
    denominator; beta1 is recomputed every ``beta1_update_interval`` steps. See
    ``stam_lite_update`` for the math. Arguments and defaults are the JAX
    STAMLite's, with torch's ``lr`` for ``learning_rate``:

    =====================  ==========  ========  ==================================
    argument               default     range     meaning
    =====================  ==========  ========  ==================================
    lr                     1e-3        >= 0      step size
    b1_base                0.9         (0, 1)    base first-moment decay
    weight_decay           0.01        >= 0      decoupled weight decay
    adapt_strength         0.2         [0, 0.5]  how far beta1 may drop below b1_base
    moment_decay           0.99        (0, 1)    decay of the gradient moments
    beta1_update_interval  5           >= 1      recompute beta1 every k steps
    state_dtype            None        dtype     storage dtype of exp_avg (None: float32,
                                                 or float64 for float64 parameters)
    eps                    1e-8        > 0       denominator guard
    =====================  ==========  ========  ==================================

    Each param group holds ``betas = (b1_base, moment_decay)``, torch's name:
    ``moment_decay`` is the decay of the squared-gradient average that makes
    the denominator, AdamW's beta2 for a tensor-level RMS. A scheduler that
    cycles momentum (``OneCycleLR``, ``CyclicLR``) moves ``b1_base``; ``lr``
    may be a 0-d tensor, as in torch.optim. A group given to
    ``add_param_group`` may set ``b1_base`` or ``moment_decay`` by name.

    State per parameter (JAX name in brackets): ``step`` [count], ``exp_avg``
    [mu], ``grad_mean``, ``grad_sq_mean``, ``beta1``, ``beta1_product``.
    Non-finite steps change nothing and are counted in ``nonfinite_skipped_steps``.
    """

    BETA_NAMES = ("b1_base", "moment_decay")
    _settings = SkipNonfiniteOptimizer._settings + ("state_dtype",)

    def __init__(self, params, lr=1e-3, b1_base=0.9, weight_decay=0.01, adapt_strength=0.2, moment_decay=0.99,
                 beta1_update_interval=5, state_dtype=None, eps=1e-8, error_if_nonfinite=False, fused=True):
        defaults = dict(lr=lr, betas=(b1_base, moment_decay), weight_decay=weight_decay,
                        adapt_strength=adapt_strength, beta1_update_interval=beta1_update_interval, eps=eps)
        self._check_group(defaults)
        self.state_dtype = resolve_state_dtype("state_dtype", state_dtype)
        super().__init__(params, defaults, error_if_nonfinite, fused)

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("state_dtype", None)

    def _check_group(self, group, where=""):
        require_keys(group, ("lr", "betas", "weight_decay", "adapt_strength", "beta1_update_interval", "eps"), where,
                     "STAMLite")
        check_range(f"{where}lr", group["lr"], 0.0, tensor=True)
        b1_base, moment_decay = check_pair(f"{where}betas", group["betas"])
        check_range(f"{where}b1_base", b1_base, 0.0, 1.0, low_open=True)
        check_range(f"{where}moment_decay", moment_decay, 0.0, 1.0, low_open=True)
        check_range(f"{where}weight_decay", group["weight_decay"], 0.0)
        check_range(f"{where}adapt_strength", group["adapt_strength"], 0.0, 0.5, high_open=False)
        interval = group["beta1_update_interval"]
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"{where}beta1_update_interval must be an integer >= 1, got {interval!r}")
        check_range(f"{where}eps", group["eps"], 0.0, low_open=True)

    def _initial_state(self, group, param):
        stat_dtype = torch.promote_types(param.dtype, torch.float32)
        scalar = lambda value: torch.full((), value, dtype=stat_dtype, device=param.device)  # noqa: E731
        return dict(step=scalar(0.0), exp_avg=torch.zeros_like(param, dtype=self.state_dtype or stat_dtype),
                    grad_mean=scalar(0.0), grad_sq_mean=scalar(0.0), beta1=scalar(group["betas"][0]),
                    beta1_product=scalar(1.0))

    def _prepare_group(self, group, params, grads):
        states, created = self._states(group, params)
        tensors = GroupTensors(self.fused, dict(params=params, grads=grads,
                                                mus=[state["exp_avg"] for state in states]), bf16_lists=("mus",))
        statistics = TensorStatistics(tensors, states, _TENSOR_STATISTICS,
                                      statistics_table(self, group, _TENSOR_STATISTICS))
        read = read_sums(tensors, "stam_lite_moments", ["grads"], _stam_lite_sums)
        return read, (states, created, tensors, statistics)

    def _update_group(self, group, params, grads, read, context):
        states, created, tensors, statistics = context
        self._store_states(created)
        stam_lite_update(tensors, read, statistics, lr=group["lr"], b1_base=traced_number(group["betas"][0]),
                         weight_decay=group["weight_decay"], adapt_strength=group["adapt_strength"],
                         moment_decay=group["betas"][1], beta1_update_interval=group["beta1_update_interval"],
                         eps=group["eps"])
