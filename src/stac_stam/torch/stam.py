"""STAM for PyTorch: AdamW with a variance-adaptive beta1 (seed 002), the same numbers as the JAX STAM."""

import math

import torch

from stac_stam.torch import _cpu_kernels
from stac_stam.torch._base import SkipNonfiniteOptimizer, check_pair, check_range, require_keys
from stac_stam.torch._kernels import TensorKernel, scalar_tensors, store_tensor_statistics

# sigma^2 is capped at VARIANCE_CAP * tau^2 (the seed's "variance explosion" guard); as in the JAX STAM.
VARIANCE_CAP = 10.0


def _stam_rule(residual_sq_mean, residual_abs_mean, *, variance, scale, beta1_product, step, lr, b1_base, b2,
               one_minus_b2, log_b2, adapt_strength, tau_decay, one_minus_tau_decay, eps):
    # The new per-tensor numbers from this step's mean(r^2) and mean(|r|). Elementwise: it serves one tensor (0-d
    # numbers) or a whole group at once (one value per tensor).
    new_variance = b2 * variance + one_minus_b2 * residual_sq_mean
    new_scale = tau_decay * scale + one_minus_tau_decay * residual_abs_mean
    finite = new_variance.isfinite() & new_scale.isfinite()
    new_variance = torch.minimum(new_variance, VARIANCE_CAP * new_scale.square())
    z = new_variance / (new_scale.square() + eps)
    adapted = torch.clamp(b1_base * (1 - adapt_strength * z / (1 + z)), b1_base * (1 - adapt_strength), b1_base)
    beta1 = torch.where(finite, adapted, b1_base)
    new_step, new_beta1_product = step + 1, beta1_product * beta1
    return (torch.where(finite, new_variance, variance), torch.where(finite, new_scale, scale), beta1,
            new_beta1_product, new_step, lr / (1 - new_beta1_product),
            -torch.expm1(new_step * log_b2))  # 1 - b2^t, exact for b2 near 1


def _stam_statistics(grad, mu, *, mean, **numbers):
    # One read of g and mu; every per-tensor number the update needs, none of the state changed.
    residual = grad.to(mu.dtype) - mu
    return torch.isfinite(grad).all(), *_stam_rule(mean(residual.square()), mean(residual.abs()), **numbers)


def _stam_tensor_step(param, grad, mu, nu, *, beta1, step_size, bias_correction2, decay, b2, one_minus_b2, eps):
    g = grad.to(mu.dtype)
    mu.copy_(beta1 * mu + (1 - beta1) * g)
    nu.copy_(b2 * nu + one_minus_b2 * g * g)
    param.copy_(param * decay - step_size * mu / ((nu / bias_correction2).sqrt() + eps))


_stam_statistics_kernel = TensorKernel(_stam_statistics)
_stam_kernel = TensorKernel(_stam_tensor_step, writes=("param", "mu", "nu"))

# The 0-d state entries, in the order _stam_statistics returns their new values.
_TENSOR_STATISTICS = ("variance", "scale", "beta1", "beta1_product", "step")
# The 0-d state entries the statistics read (beta1 is only logged).
_STATE_INPUTS = ("variance", "scale", "beta1_product", "step")


def stam_statistics(grads, states, *, lr, b1_base, b2, adapt_strength, tau_decay, eps, kernels, matrix=None):
    """Phase one of STAM's step: per tensor, whether g is finite and its new statistics; changes nothing.

    Returns ``(finite, statistics)``: ``finite`` 0-d bools, all True when every
    gradient is finite; ``statistics`` the new ``(variance, scale, beta1,
    beta1_product, step, step_size, bias_correction2)`` for ``stam_update``,
    per tensor as 0-d tensors, or with ``kernels="cpu"`` each as one vector
    over the group's tensors (then ``matrix`` is the group's StatisticsTable
    matrix of the 0-d state entries).
    """
    # Complements are taken in Python's float64: 1 - b2 in float32 would be off by 1e-5.
    scalars = scalar_tensors(lr=lr, b1_base=b1_base, b2=b2, one_minus_b2=1 - b2, log_b2=math.log(b2),
                             adapt_strength=adapt_strength, tau_decay=tau_decay, one_minus_tau_decay=1 - tau_decay,
                             eps=eps)
    mus = [state["exp_avg"] for state in states]
    if kernels == "cpu":
        saved = {key: row for key, row in zip(_TENSOR_STATISTICS, matrix) if key in _STATE_INPUTS}
        return _cpu_kernels.group_statistics("stam_moments", [grads, mus], _stam_rule, saved,
                                             scalars(grads[0].device, torch.float32))
    return _stam_statistics_kernel.map_statistics(
        kernels == "compiled", [(grad, mu) for grad, mu in zip(grads, mus)],
        [dict({key: state[key] for key in _STATE_INPUTS}, **scalars(state["exp_avg"].device, state["exp_avg"].dtype))
         for state in states])


def stam_update(params, grads, states, statistics, *, lr, b2, weight_decay, eps, kernels, matrix=None):
    r"""Phase two of STAM's step (seed 002, "Core Update Rules"): the state and the parameters, in place.

    Per tensor, at step t, with gradient g::

        r      = g - mu_{t-1}
        var_t  = b2 var_{t-1} + (1 - b2) mean(r^2)          capped at 10 tau_t^2
        tau_t  = tau_decay tau_{t-1} + (1 - tau_decay) mean(|r|)
        z      = var_t / (tau_t^2 + eps)
        beta1  = clip(b1_base (1 - adapt_strength z / (1 + z)), b1_base (1 - adapt_strength), b1_base)
        mu_t   = beta1 mu_{t-1} + (1 - beta1) g;     nu_t = b2 nu_{t-1} + (1 - b2) g^2
        p     <- p (1 - lr weight_decay) - lr [mu_t / (1 - prod beta1)] / (sqrt(nu_t / (1 - b2^t)) + eps)

    Non-finite var_t or tau_t: beta1 = b1_base and both keep their old values.
    ``statistics`` come from ``stam_statistics`` (the first three lines and the
    step's coefficients, from one read of g and mu); here each tensor is one
    pass updating mu, nu and p. ``kernels``: ``"cpu"`` runs the group's
    float32 CPU tensors as one call of the C kernels in ``_cpu_kernels.c``
    (storing the statistics into ``matrix``), ``"compiled"`` each tensor
    compiled, ``"op_by_op"`` eagerly. The tensor
    statistics stay on the device (no host sync).
    Low-precision parameters are computed in float32 and stored back.
    """
    mus, nus = [state["exp_avg"] for state in states], [state["exp_avg_sq"] for state in states]
    if kernels == "cpu":
        _cpu_kernels.store_statistics(matrix, statistics)
        _, _, beta1, _, _, step_size, bias_correction2 = statistics
        _cpu_kernels.run("stam_step", [params, grads, mus, nus], [beta1, step_size, bias_correction2],
                         [1 - lr * weight_decay, b2, 1 - b2, eps])
        return
    scalars = scalar_tensors(decay=1 - lr * weight_decay, b2=b2, one_minus_b2=1 - b2, eps=eps)
    store_tensor_statistics(states, _TENSOR_STATISTICS, statistics)
    _stam_kernel.map(kernels == "compiled",
                     [(param, grad, mu, nu) for param, grad, mu, nu in zip(params, grads, mus, nus)],
                     [dict(beta1=beta1, step_size=step_size, bias_correction2=bias_correction2,
                           **scalars(state["exp_avg"].device, state["exp_avg"].dtype))
                      for state, (_, _, beta1, _, _, step_size, bias_correction2) in zip(states, statistics)])


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
        states = self._states(group, params)
        moments = [[state["exp_avg"] for state in states], [state["exp_avg_sq"] for state in states]]
        kernels, matrix = _cpu_kernels.choose(self.fused, [params, grads, *moments],
                                              _cpu_kernels.statistics_table(self, group, _TENSOR_STATISTICS), states)
        finite, statistics = stam_statistics(
            grads, states, lr=group["lr"], b1_base=group["betas"][0], b2=group["betas"][1],
            adapt_strength=group["adapt_strength"], tau_decay=group["tau_decay"], eps=group["eps"], kernels=kernels,
            matrix=matrix)
        return finite, (states, kernels, matrix, statistics)

    def _update_group(self, group, params, grads, statistics):
        states, kernels, matrix, statistics = statistics
        self._store_states(params, states)
        stam_update(params, grads, states, statistics, lr=group["lr"], b2=group["betas"][1],
                    weight_decay=group["weight_decay"], eps=group["eps"], kernels=kernels, matrix=matrix)
